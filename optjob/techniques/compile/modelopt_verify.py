"""What the Model Optimizer readers need of a checkpoint, checked before the accuracy gate.

TensorRT-LLM's and vLLM's ModelOpt loaders both fill a missing ``weight_scale`` or ``input_scale``
with a placeholder instead of failing, so a checkpoint that lost one would load and serve garbage.
Before publishing, each FP8 weight must carry a finite, positive ``weight_scale`` and
``input_scale``, each INT8 (SmoothQuant) weight its per-channel ``weight_scale``, ``input_scale``
and ``pre_quant_scale``, each INT4 weight its per-group ``weight_scale`` (and its AWQ
``pre_quant_scale`` where stored), each NVFP4 weight its E4M3 block ``weight_scale`` (one per 16
inputs), its per-tensor ``weight_scale_2`` and ``input_scale``, and the KV projections their
``k_scale`` / ``v_scale`` when the KV cache is FP8. Every source tensor must be there under its own
name, and every tensor left unquantized must be in the published dtype (and, when nothing was
quantized, equal to the source). The numbers (each weight dequantized with its own scales, the
layer-by-layer replay with quantized inputs) are the shared gate's (``optjob.verify.gate``).
Tensors are read one at a time, so the check works at any size.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from optjob.errors import VerificationFailed
from optjob.verify.tensors import CheckpointReader

SCALES = ("weight_scale", "weight_scale_2", "input_scale", "k_scale", "v_scale", "pre_quant_scale")
QUANTIZED = ("F8_E4M3", "I8", "U8")  # safetensors dtypes of Model Optimizer's FP8, INT8 and packed INT4 weights
PLAIN = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def _scale(reader: CheckpointReader, name: str, problems: list[str], *, shape: list[int] | None = None) -> None:
    """A scale the loaders need: present, the expected shape (one value by default), finite and positive."""
    if name not in reader.map:
        problems.append(f"{name} is missing (the loaders would substitute a placeholder)")
        return
    value = reader.get(name).float()
    if shape is None and value.numel() != 1:
        problems.append(f"{name} has shape {list(value.shape)}, not one per-tensor scale")
    elif shape is not None and list(value.shape) != shape:
        problems.append(f"{name} has shape {list(value.shape)} where the weight needs {shape}")
    elif not bool(torch.isfinite(value).all()) or not bool((value > 0).all()):
        problems.append(f"{name} is {value.flatten()[:4].tolist()}, not finite positive scales")


def verify_modelopt_checkpoint(
    source: Path, output: Path, *, scheme: str, dtype: str, kv_fp8: bool, group_size: int = 128
) -> dict[str, Any]:
    """Counts for the manifest; raises VerificationFailed naming the first problems."""
    problems: list[str] = []
    counts = {"quantized": 0, "unquantized": 0}
    with ExitStack() as stack:
        src = CheckpointReader(source, stack)
        out = CheckpointReader(output, stack)
        missing = sorted(name for name in src.map if name not in out.map)
        if missing:
            problems.append(f"{len(missing)} source tensors are missing from the output, first {missing[0]}")
        for name in sorted(out.map):
            if name.rsplit(".", 1)[-1] in SCALES:
                continue
            if name not in src.map:
                problems.append(f"{name} is not a tensor of the source model")
                continue
            stored = out.slice(name).get_dtype()  # from the header: the data is the accuracy gate's to read
            module = name.removesuffix(".weight")
            if stored == "F8_E4M3":
                counts["quantized"] += 1
                _scale(out, f"{module}.weight_scale", problems)
                _scale(out, f"{module}.input_scale", problems)
            elif stored == "I8":  # SmoothQuant INT8: per-channel weight scales, smoothing factors
                counts["quantized"] += 1
                rows, columns = src.slice(name).get_shape()
                _scale(out, f"{module}.weight_scale", problems, shape=[rows])
                _scale(out, f"{module}.input_scale", problems)
                _scale(out, f"{module}.pre_quant_scale", problems, shape=[columns])
            elif stored == "U8" and scheme == "nvfp4":  # E2M1, two input columns per byte, blocks of 16
                counts["quantized"] += 1
                rows, columns = src.slice(name).get_shape()
                if list(out.slice(name).get_shape()) != [rows, columns // 2]:
                    problems.append(
                        f"{name} has shape {list(out.slice(name).get_shape())}, not [{rows}, {columns // 2}]"
                    )
                if f"{module}.weight_scale" in out.map and out.slice(f"{module}.weight_scale").get_dtype() != "F8_E4M3":
                    problems.append(
                        f"{module}.weight_scale is {out.slice(f'{module}.weight_scale').get_dtype()}, not F8_E4M3"
                    )
                _scale(out, f"{module}.weight_scale", problems, shape=[rows, columns // 16])
                _scale(out, f"{module}.weight_scale_2", problems)
                _scale(out, f"{module}.input_scale", problems)
            elif stored == "U8":  # INT4, two output rows per byte, one scale per group of inputs
                counts["quantized"] += 1
                rows, columns = src.slice(name).get_shape()
                _scale(out, f"{module}.weight_scale", problems, shape=[rows, columns // group_size])
                if f"{module}.pre_quant_scale" in out.map:
                    _scale(out, f"{module}.pre_quant_scale", problems, shape=[columns])
            if stored in QUANTIZED:
                if kv_fp8 and module.endswith(("k_proj", "v_proj")):
                    _scale(out, f"{module}.{module[-6]}_scale", problems)
                continue
            counts["unquantized"] += 1
            stored = PLAIN.get(stored, stored)
            if stored != dtype:
                problems.append(f"{name} is {stored}, not the published {dtype}")
            elif scheme == "none" and not torch.equal(tensor := out.get(name), src.get(name).to(tensor.dtype)):
                problems.append(f"{name} differs from the source beyond the dtype conversion")
    if scheme != "none" and not counts["quantized"]:
        problems.append("no tensor of the output is quantized")
    if problems:
        raise VerificationFailed(
            f"The Model Optimizer checkpoint failed verification ({len(problems)} problems): "
            + "; ".join(problems[:3])
            + ". Nothing was published"
        )
    return counts
