"""Targeting rules from ``configs/capabilities.yaml`` evaluated against an ``InstanceSpec``.

No instance names appear in code: a rule matches on the target's family, compute capability and
data-type support, so adding an instance type (or a GPU generation) is a catalog/config change.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from optjob.config_files import load_config
from optjob.pipeline.stage import PlanError
from optjob.targets.catalog import InstanceSpec


def _cc(text: str) -> tuple[int, int]:
    major, _, minor = str(text).partition(".")
    return int(major), int(minor or 0)


def matches(when: Mapping[str, Any], target: InstanceSpec) -> bool:
    """True when every condition of a rule's ``when`` holds for ``target``."""
    for key, want in when.items():
        if key == "family":
            if target.family != want:
                return False
        elif key in ("bf16", "fp8"):
            if bool(getattr(target, key)) != bool(want):
                return False
        elif key in ("cc_below", "cc_at_least"):
            cap = target.capability
            if cap is None:
                return False
            if key == "cc_below" and not cap < _cc(want):
                return False
            if key == "cc_at_least" and not cap >= _cc(want):
                return False
        else:
            raise ValueError(f"configs/capabilities.yaml: unknown condition {key!r}")
    return True


@dataclass
class TargetDecision:
    """What the rules say for one scheme on one target."""

    warnings: list[str] = field(default_factory=list)
    dtype: str = "auto"
    applied: list[str] = field(default_factory=list)


def _fmt(message: str, scheme: str, target: InstanceSpec) -> str:
    return " ".join(
        message.format(
            scheme=scheme,
            instance=target.name,
            accelerator=target.accelerator,
            cc=(target.compute_capability or "").replace(".", ""),
            family=target.family,
        ).split()
    )


def evaluate(scheme: str, env: Mapping[str, str], dtype: str, target: InstanceSpec, *, path: str) -> TargetDecision:
    """Apply every matching rule; a reject raises ``PlanError`` with the rule's reason."""
    config = load_config("capabilities.yaml")
    decision = TargetDecision(dtype=dtype)
    for rule in config.get("rules", []):
        schemes = rule.get("schemes", ["*"])
        if "*" not in schemes and scheme not in schemes:
            continue
        if not matches(rule.get("when", {}), target):
            continue
        wanted = rule.get("params") or {}
        if any(str(env.get(k, "")).lower() not in [str(v).lower() for v in vs] for k, vs in wanted.items()):
            continue
        message = _fmt(rule["message"], scheme, target)
        decision.applied.append(rule["id"])
        if rule["action"] == "reject":
            raise PlanError(f"{path}: {message}")
        decision.warnings.append(message)
    for rule in config.get("dtype", []):
        if not matches(rule.get("when", {}), target):
            continue
        decision.applied.append(rule["id"])
        message = _fmt(rule["message"], scheme, target)
        if dtype in rule.get("forbid", []):
            raise PlanError(f"{path}: OPTION_DTYPE={dtype}: {message}")
        if dtype == "auto" and rule.get("auto"):
            decision.dtype = rule["auto"]
            decision.warnings.append(message)
    return decision
