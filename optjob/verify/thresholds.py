"""The verification thresholds, in one place: ``configs/verify.yaml`` and each scheme's overlay.

Both the gate and the end-to-end replay read them; neither owns them, so neither imports the other
for them.
"""

from __future__ import annotations

from typing import Any

from optjob.config_files import load_config


def thresholds_config() -> dict[str, Any]:
    return dict(load_config("verify.yaml"))


def thresholds_for(scheme_key: str) -> dict[str, Any]:
    """Defaults overlaid with the scheme's entry (``fp8_dynamic``, ``awq``, ``nf4``, ...)."""
    cfg = thresholds_config()
    scheme = cfg.get("schemes", {}).get(scheme_key, {})
    out: dict[str, Any] = {"judge": scheme.get("judge", cfg["defaults"].get("judge", "weights"))}
    for part in ("per_tensor", "corruption", "e2e"):
        out[part] = {**cfg["defaults"].get(part, {}), **scheme.get(part, {})}
    return out
