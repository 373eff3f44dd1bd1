"""Pre-flight memory fit: will the quantized model plus a KV-cache reserve fit the target?

Model size is unknown at Create, so this runs in the worker before any quantization, from
``config.json`` and the safetensors headers only (no tensor is read). Quantized Linear weights
count at the scheme's stored bits per weight (scales included, ``weight_bits`` in
configs/quantization.yaml); everything else at the output dtype. The total, split over the
tensor-parallel degree, must fit each accelerator at vLLM's memory utilization.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from optjob.config_files import load_config
from optjob.errors import InputError
from optjob.storage.inputs import SAFETENSORS_INDEX as WEIGHTS_INDEX
from optjob.targets.catalog import InstanceSpec
from optjob.techniques.quantize.params import QuantizationParams

_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "I32": 4}
_OUT_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


@dataclass
class MemoryFit:
    quantized_weight_gib: float
    other_weight_gib: float
    kv_cache_gib: float
    overhead_gib: float
    per_accelerator_gib: float
    budget_per_accelerator_gib: float
    tensor_parallel_degree: int
    fits: bool

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def _tensor_shapes(model_dir: Path) -> dict[str, tuple[str, int]]:
    """name -> (dtype, numel): from the safetensors headers when every shard is local, else from the
    architecture. A streaming job plans while its shards are still arriving, and counting only the
    ones already there would report a model as fitting when it does not."""
    from optjob.storage.safetensors_io import ShardReader
    from optjob.techniques.quantize.skeleton import skeleton

    files = _complete_weight_files(model_dir)
    if not files:
        return skeleton(model_dir).parameters
    out: dict[str, tuple[str, int]] = {}
    for file in files:
        with ShardReader(file) as reader:
            out.update({name: (spec["dtype"], math.prod(spec["shape"])) for name, spec in reader.table.items()})
    return out


def _complete_weight_files(model_dir: Path) -> list[Path]:
    """Every weight file the checkpoint has, or [] if any of them is not local (yet)."""
    from optjob.storage.inputs import indexed_weight_names

    if (model_dir / WEIGHTS_INDEX).is_file():
        files = [model_dir / name for name in indexed_weight_names(model_dir)]
        return files if files and all(f.is_file() for f in files) else []
    return sorted(model_dir.glob("*.safetensors"))


def weight_bits(params: QuantizationParams) -> float:
    bits = load_config("quantization.yaml")["schemes"][params.quantize]["weight_bits"]
    if bits == "awq":
        return params.awq_weight_bit_width + 32.0 / params.awq_block_size  # + fp16 scale & zero per group
    return float(bits)


def estimate(
    model_dir: Path,
    params: QuantizationParams,
    target: InstanceSpec,
    *,
    linear_modules: set[str],
    ignore: list[str],
    dtype: str,
) -> MemoryFit:
    from optjob.techniques.quantize.streaming import is_ignored

    cfg = json.loads((model_dir / "config.json").read_text())
    mem_cfg = load_config("quantization.yaml")["memory_fit"]
    q_bits = weight_bits(params)
    quant_bytes = other_bytes = 0.0
    for name, (st_dtype, numel) in _tensor_shapes(model_dir).items():
        module, _, param = name.rpartition(".")
        if param == "weight" and module in linear_modules and not is_ignored(module, ignore):
            quant_bytes += numel * q_bits / 8
        else:
            other_bytes += numel * _OUT_BYTES.get(dtype, _DTYPE_BYTES.get(st_dtype, 2))
    layers = int(cfg.get("num_hidden_layers", 0))
    heads = int(cfg.get("num_attention_heads", 1))
    kv_heads = int(cfg.get("num_key_value_heads", heads))
    head_dim = int(cfg.get("head_dim") or cfg.get("hidden_size", 0) // max(heads, 1))
    kv_bytes_per = 1 if params.kv_cache_dtype.startswith("fp8") else 2
    kv = 2 * layers * kv_heads * head_dim * params.max_model_len * int(mem_cfg["kv_cache_sequences"]) * kv_bytes_per
    overhead = (quant_bytes + other_bytes) * float(mem_cfg["overhead_fraction"])
    tp = params.tensor_parallel_degree or target.accelerator_count
    per_acc = (quant_bytes + other_bytes + kv + overhead) / tp
    budget = target.memory_gib * 2**30 * float(mem_cfg["gpu_memory_utilization"])
    gib = 2**30
    return MemoryFit(
        quantized_weight_gib=quant_bytes / gib,
        other_weight_gib=other_bytes / gib,
        kv_cache_gib=kv / gib,
        overhead_gib=overhead / gib,
        per_accelerator_gib=per_acc / gib,
        budget_per_accelerator_gib=budget / gib,
        tensor_parallel_degree=tp,
        fits=per_acc <= budget,
    )


def check_fit(fit: MemoryFit, target: InstanceSpec) -> None:
    """Raise ``InputError`` naming the numbers when the model cannot be served on the target."""
    if fit.fits:
        return
    raise InputError(
        f"The quantized model does not fit {target.name}: weights {fit.quantized_weight_gib:.2f} GiB quantized + "
        f"{fit.other_weight_gib:.2f} GiB unquantized, KV cache {fit.kv_cache_gib:.2f} GiB, overhead "
        f"{fit.overhead_gib:.2f} GiB over tensor-parallel degree {fit.tensor_parallel_degree} = "
        f"{fit.per_accelerator_gib:.2f} GiB per accelerator > {fit.budget_per_accelerator_gib:.2f} GiB usable of "
        f"{target.memory_gib:g} GiB ({target.accelerator}). Use a larger instance, a higher "
        "OPTION_TENSOR_PARALLEL_DEGREE, a lower-bit scheme or a smaller OPTION_MAX_MODEL_LEN."
    )
