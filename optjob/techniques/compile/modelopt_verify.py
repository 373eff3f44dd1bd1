"""The gate for Model Optimizer checkpoints: every tensor read back with the checkpoint's own scales.

TensorRT-LLM's and vLLM's ModelOpt loaders both fill a missing ``weight_scale`` or ``input_scale``
with a placeholder instead of failing, so a checkpoint that lost one would load and serve garbage.
Before publishing, each FP8 weight must carry a finite, positive ``weight_scale`` and
``input_scale`` (and the KV projections their ``k_scale`` / ``v_scale`` when the KV cache is FP8);
``weight x weight_scale`` must match the source within ``configs/verify.yaml``'s ``modelopt_fp8``
figures; every tensor left unquantized must equal the source in the published dtype; and no source
tensor may be missing. Tensors are read one at a time, so the check works at any model size.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from optjob.errors import VerificationFailed
from optjob.verify.gate import thresholds_for
from optjob.verify.tensors import CheckpointReader

SCALES = ("weight_scale", "input_scale", "k_scale", "v_scale")


def _relative(deq: torch.Tensor, src: torch.Tensor) -> tuple[float, float]:
    d, s = deq.double().flatten(), src.double().flatten()
    norm = float(s.norm())
    rel = float((d - s).norm()) / norm if norm else float((d - s).norm())
    cos = float(torch.nn.functional.cosine_similarity(d, s, dim=0)) if norm and float(d.norm()) else 1.0
    return rel, cos


def _scale(reader: CheckpointReader, name: str, problems: list[str]) -> float | None:
    if name not in reader.map:
        problems.append(f"{name} is missing (the loaders would substitute a placeholder)")
        return None
    value = reader.get(name).float()
    if value.numel() != 1 or not math.isfinite(float(value)) or float(value) <= 0:
        problems.append(f"{name} is {value.flatten()[:4].tolist()}, not one finite positive scale")
        return None
    return float(value)


def verify_modelopt_checkpoint(source: Path, output: Path, *, scheme: str, dtype: str, kv_fp8: bool) -> dict[str, Any]:
    """Figures for the manifest; raises VerificationFailed naming the first problems."""
    limits = thresholds_for(f"modelopt_{scheme}")["per_tensor"]
    problems: list[str] = []
    worst = {"max_rel_error": 0.0, "min_cosine": 1.0, "quantized": 0, "unquantized": 0}
    with ExitStack() as stack:
        src = CheckpointReader(source, stack)
        out = CheckpointReader(output, stack)
        missing = sorted(name for name in src.map if name not in out.map)
        if missing:
            problems.append(f"{len(missing)} source tensors are missing from the output, first {missing[0]}")
        for name in sorted(out.map):
            if name.rsplit(".", 1)[-1] in SCALES:
                continue
            tensor = out.get(name)
            if name not in src.map:
                problems.append(f"{name} is not a tensor of the source model")
                continue
            reference = src.get(name)
            if tensor.dtype == torch.float8_e4m3fn:
                module = name.removesuffix(".weight")
                weight_scale = _scale(out, f"{module}.weight_scale", problems)
                _scale(out, f"{module}.input_scale", problems)
                if kv_fp8 and module.endswith(("k_proj", "v_proj")):
                    _scale(out, f"{module}.{module[-6]}_scale", problems)
                if weight_scale is None:
                    continue
                rel, cos = _relative(tensor.float() * weight_scale, reference.float())
                worst["quantized"] += 1
                if rel > limits["max_rel_error"] or cos < limits["min_cosine"]:
                    problems.append(
                        f"{name} dequantized with its weight_scale differs from the source: relative error "
                        f"{rel:.3f} (limit {limits['max_rel_error']}), cosine {cos:.4f} (limit {limits['min_cosine']})"
                    )
            else:
                if str(tensor.dtype).removeprefix("torch.") != dtype:
                    problems.append(f"{name} is {str(tensor.dtype).removeprefix('torch.')}, not the published {dtype}")
                    continue
                rel, cos = _relative(tensor, reference.to(tensor.dtype))
                worst["unquantized"] += 1
                if rel > 0:
                    problems.append(
                        f"{name} was left unquantized but differs from the source (relative error {rel:.3g})"
                    )
            worst["max_rel_error"] = max(worst["max_rel_error"], rel)
            worst["min_cosine"] = min(worst["min_cosine"], cos)
    if scheme != "none" and not worst["quantized"]:
        problems.append("no tensor of the output is quantized")
    if problems:
        raise VerificationFailed(
            f"The Model Optimizer checkpoint failed verification ({len(problems)} problems): "
            + "; ".join(problems[:3])
            + ". Nothing was published"
        )
    return {key: round(value, 6) if isinstance(value, float) else value for key, value in worst.items()}
