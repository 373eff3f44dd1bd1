"""The verification gate: nothing unverified is published.

Two checks, thresholds per scheme from ``configs/verify.yaml``:
1. per-tensor (always, streamed): dequantized weights vs source, relative error and cosine;
2. end to end (when source and output fit this worker's memory): fresh-process reload and
   next-token comparison on fixed prompts, top-1 agreement and mean KL.

``run_gate`` returns the figures for the manifest, or raises ``VerificationFailed`` whose message
(the job's FailureReason) carries the failing figures and their thresholds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optjob.config_files import load_config
from optjob.errors import VerificationFailed
from optjob.pipeline.events import NULL_SINK, EventSink
from optjob.verify.tensors import TensorFigures, compare_checkpoints


def thresholds_config() -> dict[str, Any]:
    return dict(load_config("verify.yaml"))


def thresholds_for(scheme_key: str) -> dict[str, dict[str, Any]]:
    """Defaults overlaid with the scheme's entry (``fp8_dynamic``, ``awq``, ``nf4``, ...)."""
    cfg = thresholds_config()
    scheme = cfg.get("schemes", {}).get(scheme_key, {})
    out: dict[str, dict[str, Any]] = {}
    for part in ("per_tensor", "e2e"):
        out[part] = {**cfg["defaults"].get(part, {}), **scheme.get(part, {})}
    return out


def per_tensor_mode(scheme_key: str) -> str:
    """``direct`` or ``channel_rescaled`` (schemes that smooth activations rescale channels)."""
    return str(thresholds_for(scheme_key)["per_tensor"].get("mode", "direct"))


def _dir_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def e2e_fits(source: Path, output: Path, fraction: float, max_source_gib: float | None = None) -> tuple[bool, str]:
    """Whether a CPU reload of both fits: the source in fp32 (x2 for bf16/fp16 files) plus the
    output decompressed to 16-bit (~source size), against the memory available now; and whether
    the source is within ``max_source_gib`` (a CPU forward pass of a large model takes minutes
    and several times the model's size in memory, so beyond it the per-tensor check decides)."""
    import psutil

    source_bytes = _dir_bytes(source)
    if max_source_gib is not None and source_bytes > max_source_gib * 2**30:
        return False, f"source weights {source_bytes / 2**30:.2f} GiB > e2e.max_source_gib {max_source_gib:g}"
    need = 2 * source_bytes + source_bytes + _dir_bytes(output)
    have = psutil.virtual_memory().available
    ok = need < fraction * have
    return ok, f"needs ~{need / 2**30:.2f} GiB, {have / 2**30:.2f} GiB available (limit {fraction:.0%})"


@dataclass
class GateReport:
    scheme: str
    passed: bool
    per_tensor: dict[str, Any]
    e2e: dict[str, Any] | None
    thresholds: dict[str, Any]
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme,
            "passed": self.passed,
            "per_tensor": self.per_tensor,
            "e2e": self.e2e,
            "thresholds": self.thresholds,
            "failures": self.failures,
            "notes": self.notes,
        }


def _bad(value: float) -> bool:
    return not math.isfinite(value)


def evaluate(scheme_key: str, per_tensor: dict[str, Any], e2e: dict[str, Any] | None) -> list[str]:
    """Failure lines (empty = pass) for the figures against the scheme's thresholds."""
    limits = thresholds_for(scheme_key)
    pt, ee = limits["per_tensor"], limits["e2e"]
    failures = []
    if per_tensor.get("quantized_tensors", 0) == 0:
        failures.append("no quantized tensors found in the output")
    if _bad(per_tensor["max_rel_error"]) or per_tensor["max_rel_error"] > pt["max_rel_error"]:
        failures.append(
            f"per-tensor relative error {per_tensor['max_rel_error']:.4g} > {pt['max_rel_error']} "
            f"({per_tensor['worst_tensor']})"
        )
    if _bad(per_tensor["min_cosine"]) or per_tensor["min_cosine"] < pt["min_cosine"]:
        failures.append(f"per-tensor cosine {per_tensor['min_cosine']:.5g} < {pt['min_cosine']}")
    if per_tensor.get("unquantized_max_rel_error", 0.0) > pt["unquantized_max_rel_error"]:
        failures.append(
            f"unquantized tensor changed: relative error {per_tensor['unquantized_max_rel_error']:.4g} > "
            f"{pt['unquantized_max_rel_error']} ({per_tensor['unquantized_worst_tensor']})"
        )
    if e2e is not None:
        if not e2e.get("finite", True) or _bad(e2e["mean_kl"]) or e2e["mean_kl"] > ee["max_mean_kl"]:
            failures.append(f"end-to-end mean KL {e2e['mean_kl']:.4g} > {ee['max_mean_kl']}")
        if e2e["top1_agreement"] < ee["min_top1"]:
            failures.append(f"end-to-end top-1 agreement {e2e['top1_agreement']:.3f} < {ee['min_top1']}")
    return failures


def run_gate(
    source: Path,
    output: Path,
    scheme_key: str,
    *,
    events: EventSink = NULL_SINK,
    e2e: bool | None = None,
    per_tensor_figures: TensorFigures | None = None,
) -> GateReport:
    """Verify ``output`` against ``source``; raises ``VerificationFailed`` below threshold.

    ``per_tensor_figures`` are figures already measured shard by shard (a streaming job checks
    each shard as it is written); without them the whole checkpoint is compared here.
    """
    cfg = thresholds_config()
    limits = thresholds_for(scheme_key)
    if per_tensor_figures is None:
        events("verify", "per_tensor", 0.0, "dequantizing and comparing every quantized tensor")
        per_tensor_figures = compare_checkpoints(source, output, mode=per_tensor_mode(scheme_key))
    per_tensor = per_tensor_figures.as_dict()
    notes: list[str] = []
    e2e_figures = None
    run_e2e = cfg["e2e"].get("enabled", True) if e2e is None else e2e
    if run_e2e:
        fits, detail = e2e_fits(
            source, output, float(cfg["e2e"].get("memory_fraction", 0.6)), cfg["e2e"].get("max_source_gib")
        )
        if fits:
            from optjob.verify.e2e import run_in_subprocess

            events("verify", "e2e", 0.5, "reloading the output in a fresh process")
            e2e_figures = run_in_subprocess(
                source,
                output,
                list(cfg["prompts"]),
                max_tokens=int(cfg["e2e"].get("max_tokens", 128)),
                timeout_s=float(cfg["e2e"].get("timeout_s", 1800)),
            )
        else:
            notes.append(f"end-to-end check skipped: model does not fit this worker's memory ({detail})")
    else:
        notes.append("end-to-end check disabled")
    failures = evaluate(scheme_key, per_tensor, e2e_figures)
    report = GateReport(scheme_key, not failures, per_tensor, e2e_figures, limits, failures, notes)
    events("verify", "done", 1.0, "passed" if report.passed else "; ".join(failures))
    if failures:
        figures_text = f"max_rel_error={per_tensor['max_rel_error']:.4g}, min_cosine={per_tensor['min_cosine']:.5g}"
        if e2e_figures is not None:
            figures_text += (
                f", top1_agreement={e2e_figures['top1_agreement']:.3f}, mean_kl={e2e_figures['mean_kl']:.4g}"
            )
        raise VerificationFailed(
            f"Quantized model failed verification ({scheme_key}): {'; '.join(failures)}. "
            f"Figures: {figures_text}. Nothing was published."[:1024]
        )
    return report
