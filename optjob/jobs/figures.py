"""What a job's recorded figures say: its verification results, its phase timings, its acceptance curve.

A finished job's figures are the per-stage ``metrics`` the pipeline gathered (the manifest's
``metrics``, kept in the store as ``JobRecord.outcome``). Their shape is each technique's own; this
module knows the few members that mean the same everywhere (``verification``, ``gate``,
``acceptance``, ``phases``/``phases_s``), so the console and ``/metrics`` read them one way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Figure:
    """One verification or result figure: where it comes from, what it is called, its value."""

    stage: str
    name: str
    value: str
    checked: bool = False  # a verification result (not a threshold, a setting or a timing)


def _numbers(values: Any) -> dict[str, float]:
    if not isinstance(values, Mapping):
        return {}
    return {str(k): float(v) for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _scalar(value: Any) -> str | None:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):
        return value[:200]
    return None


def _flatten(stage: str, prefix: str, values: Any, out: list[Figure], *, checked: bool = False, depth: int = 0) -> None:
    if isinstance(values, Mapping) and depth < 3:
        for key, value in values.items():
            inner = checked and key not in _NOT_RESULTS
            _flatten(stage, f"{prefix}.{key}" if prefix else str(key), value, out, checked=inner, depth=depth + 1)
        return
    shown = _scalar(values)
    if shown is not None:
        out.append(Figure(stage, prefix, shown, checked))


# Members of a stage's figures that hold verification results, in the order a reader wants them.
_VERIFICATION_KEYS = ("verification", "gate", "acceptance", "floor", "evaluation", "check")
# Members inside those that configure the check rather than report its result.
_NOT_RESULTS = frozenset({"thresholds", "settings", "config", "seconds", "rss_at_start_mib"})


def stage_figures(metrics: Mapping[str, Any]) -> tuple[list[Figure], dict[str, dict[str, float]], dict[str, list]]:
    """Verification figures first (per-tensor, end-to-end, gates, acceptance: ``checked``), then the
    rest of each stage's scalars; each stage's own phase timings; EAGLE acceptance per draft position."""
    figures: list[Figure] = []
    phases: dict[str, dict[str, float]] = {}
    acceptance: dict[str, list[float]] = {}
    for stage, values in metrics.items():
        if not isinstance(values, Mapping):
            continue
        for key in _VERIFICATION_KEYS:
            if key in values:
                _flatten(stage, key, values[key], figures, checked=True)
        for inside_stream, timings in _phase_sources(values):
            label = f"{stage} (inside the stream)" if inside_stream else stage
            phases[label] = {**phases.get(label, {}), **timings}
        for key in ("acceptance", "floor"):
            per_position = (
                values.get(key, {}).get("per_position_acceptance") if isinstance(values.get(key), Mapping) else None
            )
            if isinstance(per_position, list):
                acceptance[f"{stage} {key}"] = [float(v) for v in per_position if isinstance(v, int | float)]
        rest = {k: v for k, v in values.items() if k not in (*_VERIFICATION_KEYS, "phases", "phases_s", "streaming")}
        _flatten(stage, "", rest, figures)
    return figures, {k: v for k, v in phases.items() if v}, acceptance


def phase_timings(metrics: Mapping[str, Any]) -> list[tuple[str, str, float]]:
    """(optimization type, phase, seconds) for every phase timing any stage recorded: the stage's
    own ``phases``/``phases_s`` and, for a streamed stage, the stream's ``streaming.phases_s``."""
    timings: list[tuple[str, str, float]] = []
    for stage, values in metrics.items():
        if not isinstance(values, Mapping):
            continue
        kind = stage.split(":", 1)[-1]
        for _, source in _phase_sources(values):
            timings.extend((kind, phase, seconds) for phase, seconds in source.items())
    return timings


def _phase_sources(values: Mapping[str, Any]) -> list[tuple[bool, dict[str, float]]]:
    """A stage's phase timings, each marked whether it is the stream's own: its ``phases``/``phases_s``
    and, for a streamed stage, ``streaming.phases_s``."""
    streaming = values.get("streaming")
    sources = [(False, values.get("phases")), (False, values.get("phases_s"))]
    sources.append((True, streaming.get("phases_s") if isinstance(streaming, Mapping) else None))
    return [(inside, _numbers(source)) for inside, source in sources if source is not None]


def gate_passed(metrics: Mapping[str, Any]) -> bool | None:
    """Whether every stage's check passed (None when no stage recorded one)."""
    seen: list[bool] = []
    for values in metrics.values():
        if not isinstance(values, Mapping):
            continue
        for key in ("verification", "gate"):
            check = values.get(key)
            if isinstance(check, Mapping) and isinstance(check.get("passed"), bool):
                seen.append(check["passed"])
    return all(seen) if seen else None
