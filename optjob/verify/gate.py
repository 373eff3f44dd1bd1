"""The verification gate: nothing unverified is published.

Two checks, thresholds per scheme from ``configs/verify.yaml``:
0. transformers accepts the directory (``loadable``: ``from_pretrained`` on the meta device);
1. per-tensor (always, streamed): dequantized weights vs source, relative error and cosine;
2. end to end (layer by layer, any model size, in the worker): per-layer output error with
   the source's hidden states as input, then KL and top-1 agreement of the next-token
   distributions (top-1 judged only where the source is confident).

Which figures decide depends on what the scheme optimizes (``judge`` in verify.yaml): data-free
schemes (FP8, NF4, ...) round each weight on its own, so weight-space error is decisive;
error-compensating ones (GPTQ, AWQ, SmoothQuant) move error between weights on purpose, so for
them the weight-space thresholds are diagnostics and the output-space figures decide. Corruption
bounds (a zeroed, swapped or 2x mis-scaled tensor) are decisive for every scheme.

``run_gate`` returns the figures for the manifest, or raises ``VerificationFailed`` whose message
(the job's FailureReason) names the failing figures, their thresholds and what to do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optjob.errors import InfrastructureError, VerificationFailed, first_line, reason_sentence
from optjob.runtime.cancel import CancelToken
from optjob.runtime.events import NULL_SINK, EventSink
from optjob.verify.loadable import transformers_load_problems
from optjob.verify.tensors import TensorFigures, compare_checkpoints
from optjob.verify.thresholds import thresholds_config, thresholds_for


def per_tensor_mode(scheme_key: str) -> str:
    """``direct`` or ``channel_rescaled`` (schemes that smooth activations rescale channels)."""
    return str(thresholds_for(scheme_key)["per_tensor"].get("mode", "direct"))


def e2e_architecture_note(source: Path) -> str | None:
    """Why the layer-by-layer replay cannot run this model, or None when it can."""
    import json

    supported = list(thresholds_config()["e2e"]["architectures"])
    model_type = json.loads((source / "config.json").read_text()).get("model_type", "")
    if model_type in supported:
        return None
    return (
        f"end-to-end check skipped: the layer-by-layer comparison supports {', '.join(supported)}, "
        f"not {model_type!r}; the per-tensor figures decided"
    )


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


def _weight_breaches(per_tensor: dict[str, Any], limits: dict[str, Any], what: str) -> list[str]:
    out = []
    rel, cos = per_tensor["max_rel_error"], per_tensor["min_cosine"]
    if _bad(rel) or rel > limits["max_rel_error"]:
        out.append(f"{what} relative error {rel:.4g} > {limits['max_rel_error']} ({per_tensor['worst_tensor']})")
    if _bad(cos) or cos < limits["min_cosine"]:
        out.append(f"{what} cosine {cos:.5g} < {limits['min_cosine']}")
    return out


def judge(scheme_key: str, per_tensor: dict[str, Any], e2e: dict[str, Any] | None) -> tuple[list[str], list[str]]:
    """``(failures, notes)`` for the figures against the scheme's thresholds; no failures = pass."""
    limits = thresholds_for(scheme_key)
    pt, ee, bounds = limits["per_tensor"], limits["e2e"], limits["corruption"]
    failures: list[str] = []
    notes: list[str] = []
    if per_tensor.get("quantized_tensors", 0) == 0:
        failures.append("no quantized tensors found in the output")
    corrupt = _weight_breaches(per_tensor, bounds, "per-tensor (corruption bound)")
    failures.extend(corrupt)
    weight_checks = [] if corrupt else _weight_breaches(per_tensor, pt, "per-tensor")
    if limits["judge"] == "output" and e2e is not None:
        notes.extend(f"diagnostic only ({scheme_key} compensates error across weights): {w}" for w in weight_checks)
    else:
        failures.extend(weight_checks)
    if per_tensor.get("unquantized_max_rel_error", 0.0) > pt["unquantized_max_rel_error"]:
        failures.append(
            f"unquantized tensor changed: relative error {per_tensor['unquantized_max_rel_error']:.4g} > "
            f"{pt['unquantized_max_rel_error']} ({per_tensor['unquantized_worst_tensor']})"
        )
    if e2e is not None:
        if not e2e.get("finite", True) or _bad(e2e["mean_kl"]) or e2e["mean_kl"] > ee["max_mean_kl"]:
            failures.append(f"end-to-end mean KL {e2e['mean_kl']:.4g} nats > {ee['max_mean_kl']}")
        layer_err = e2e.get("max_layer_rel_error")
        if layer_err is not None and (_bad(layer_err) or layer_err > ee["max_layer_rel_error"]):
            failures.append(
                f"decoder layer {e2e.get('worst_layer')} output relative error {layer_err:.4g} > "
                f"{ee['max_layer_rel_error']}"
            )
        confident = int(e2e.get("confident_positions", 0))
        needed = int(thresholds_config()["e2e"].get("min_confident_positions", 32))
        top1 = e2e.get("confident_top1_agreement")
        if confident >= needed and top1 is not None:
            if top1 < ee["min_top1"]:
                failures.append(
                    f"end-to-end top-1 agreement {top1:.3f} < {ee['min_top1']} at the {confident} positions where "
                    f"the source is confident"
                )
        else:
            notes.append(
                f"top-1 agreement not judged: the source is confident at {confident} of {e2e.get('positions')} "
                f"positions (fewer than {needed}); KL and per-layer error decided"
            )
    return failures, notes


def evaluate(scheme_key: str, per_tensor: dict[str, Any], e2e: dict[str, Any] | None) -> list[str]:
    """Failure lines (empty = pass) for the figures against the scheme's thresholds."""
    return judge(scheme_key, per_tensor, e2e)[0]


def _advice(scheme_key: str, limits: dict[str, Any]) -> str:
    if limits["judge"] == "output":
        return (
            f"Raise OPTION_CALIB_SIZE or use calibration data like the model's real inputs "
            f"(OPTION_CALIB_DATASET), or choose a higher-precision scheme than {scheme_key}"
        )
    return f"Choose a higher-precision scheme than {scheme_key} (or keep the failing layer in OPTION_IGNORE)"


def _end_to_end(
    source: Path, output: Path, cfg: dict[str, Any], events: EventSink, cancel: CancelToken | None
) -> dict[str, Any]:
    """The layer-by-layer comparison in this process, with progress, cancellation and its own peak
    memory; a failure to read either checkpoint is a sentence for FailureReason, the traceback
    goes to the job log."""
    import traceback

    from safetensors import SafetensorError

    from optjob.runtime.usage import PeakRss
    from optjob.verify.e2e import compare_as_configured

    def progress(fraction: float, message: str) -> None:
        events("verify", "e2e", 0.5 + 0.5 * fraction, message)
        if cancel is not None:
            cancel.raise_if_cancelled()

    events("verify", "e2e", 0.5, "comparing source and output a decoder layer at a time")
    try:
        with PeakRss() as memory:
            figures = compare_as_configured(source, output, cfg, progress=progress)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        events("verify", "e2e_error", None, f"{type(exc).__name__}: {exc}", level="error",
               traceback=traceback.format_exc())  # fmt: skip
        raise InfrastructureError(
            f"The end-to-end verification could not read the checkpoints ({type(exc).__name__}: "
            f"{first_line(exc)}); nothing was published. The traceback is in the job log (optjob logs); "
            f"retry the job, and report it with that log if it fails the same way"
        ) from exc
    figures["peak_rss_above_start_mib"] = round(memory.above_start_mib, 1)
    figures["rss_at_start_mib"] = round(memory.start_mib, 1)
    return figures


def run_gate(
    source: Path,
    output: Path,
    scheme_key: str,
    *,
    events: EventSink = NULL_SINK,
    e2e: bool | None = None,
    per_tensor_figures: TensorFigures | None = None,
    cancel: CancelToken | None = None,
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
    skipped = e2e_architecture_note(source) if run_e2e else "end-to-end check disabled"
    if skipped is None:
        e2e_figures = _end_to_end(source, output, cfg, events, cancel)
        if e2e_figures.get("inputs_warning"):
            notes.append(f"end-to-end inputs: {e2e_figures['inputs_warning']}")
            events("verify", "tokenizer", None, e2e_figures["inputs_warning"], level="warning")
    else:
        notes.append(skipped)
    failures, judged_notes = judge(scheme_key, per_tensor, e2e_figures)
    notes.extend(judged_notes)
    load_problems, load_skipped = transformers_load_problems(output)
    failures.extend(load_problems)
    notes.extend([load_skipped] if load_skipped else [])
    report = GateReport(scheme_key, not failures, per_tensor, e2e_figures, limits, failures, notes)
    events("verify", "done", 1.0, "passed" if report.passed else "; ".join(failures), figures=report.as_dict())
    if failures:
        figures_text = f"max_rel_error={per_tensor['max_rel_error']:.4g}, min_cosine={per_tensor['min_cosine']:.5g}"
        if e2e_figures is not None:
            top1 = e2e_figures.get("confident_top1_agreement")
            figures_text += (
                f", max_layer_rel_error={e2e_figures['max_layer_rel_error']:.4g}"
                f", top1_agreement={e2e_figures['top1_agreement']:.3f}"
                + (f" (confident positions: {top1:.3f})" if top1 is not None else "")
                + f", mean_kl={e2e_figures['mean_kl']:.4g}"
            )
        raise VerificationFailed(
            reason_sentence(
                f"The quantized model failed verification ({scheme_key}): {'; '.join(failures)}. Nothing was "
                f"published. {_advice(scheme_key, limits)}; every figure is in the job log (optjob logs).",
                detail=f"Figures: {figures_text}.",
            )
        )
    return report
