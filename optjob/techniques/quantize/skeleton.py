"""The model's architecture from ``config.json`` alone: a meta-device instance, built once per job.

Three steps need it before any weight is read: which tensors are ``nn.Linear`` weights (what a
scheme quantizes), the parameter shapes for the memory pre-flight when the shards have not all
arrived, and the streaming quantizer's targets. Building a 1B-parameter skeleton costs about a
second of CPU even on the meta device, so it is built once and shared (keyed on the config file's
path and modification time, so a changed config is never answered from a stale entry).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

_TORCH_TO_ST = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


@dataclass(frozen=True)
class Skeleton:
    linear_modules: frozenset[str]
    parameters: dict[str, tuple[str, int]]  # name -> (safetensors dtype, element count)


def skeleton(model_dir: Path) -> Skeleton:
    config = Path(model_dir) / "config.json"
    return _build(str(config.resolve()), config.stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _build(config_path: str, _mtime_ns: int) -> Skeleton:
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(Path(config_path).parent)
    with init_empty_weights(include_buffers=True):
        model = AutoModelForCausalLM.from_config(config)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    st_dtype = _TORCH_TO_ST.get(str(dtype).removeprefix("torch."), "F32")
    return Skeleton(
        linear_modules=frozenset(name for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)),
        parameters={name: (st_dtype, param.numel()) for name, param in model.named_parameters()},
    )
