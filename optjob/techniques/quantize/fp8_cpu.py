"""A CPU kernel for FP8 weight quantization, plugged into compressed-tensors' own backend registry.

compressed-tensors' eager ``_quantize`` rounds an FP8 weight through its source dtype: clamp
against float32 bounds, cast to float8, cast *back* to bf16, then cast to float8 again. On CPU the
float8 -> bf16 cast is a scalar loop, about five times the cost of the other steps, and it made up
most of an FP8 job's compute (profiled with py-spy on a 2.47 GB checkpoint: ~60 % of the quantize
time). The round trip is lossless (every float8_e4m3fn value is exact in bf16, fp16 and fp32) so
clamping in place and casting once yields the same bits, four to five times faster.

The kernel is registered through ``ImplBackend`` — the hook the library uses for its Triton kernel —
so llm-compressor's converter and ``oneshot`` call it with no patching of their code, and it only
takes the cases it is exact for (see ``_applies``); every other call falls through to the library.
``tests/test_fp8_cpu_kernel.py`` checks it bit for bit against the library's own implementation.
"""

from __future__ import annotations

import inspect
import threading
from typing import Any

import torch

_EXACT_SOURCE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_lock = threading.Lock()
_installed = False


def _bound_is_exact(bound: torch.Tensor, dtype: torch.dtype) -> bool:
    """The library clamps against float32 bounds; a scalar bound in ``dtype`` is the same clamp only if exact."""
    value = float(bound)
    return bound.numel() == 1 and float(torch.tensor(value, dtype=dtype)) == value


@torch.no_grad()
def quantize_fp8_cpu(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    q_min: torch.Tensor,
    q_max: torch.Tensor,
    args: object,
    dtype: torch.dtype | None = None,
    global_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``round(clamp(x / scale))`` in float8, computed as the library does, minus the lossless round trip."""
    scaled = x / scale
    return scaled.clamp_(float(q_min), float(q_max)).to(dtype)


_SIGNATURE = inspect.signature(quantize_fp8_cpu)


def _applies(*args: Any, **kwargs: Any) -> bool:
    """Whether a ``_quantize`` call is one the kernel is exact for (same arguments as the call)."""
    call = _SIGNATURE.bind(*args, **kwargs)
    call.apply_defaults()
    a = call.arguments
    x, q_min, q_max = a["x"], a["q_min"], a["q_max"]
    return (
        x.device.type == "cpu"
        and x.dtype in _EXACT_SOURCE_DTYPES
        and a["dtype"] == torch.float8_e4m3fn
        and getattr(a["args"], "type", None) == "float"
        and getattr(a["args"], "num_bits", None) == 8
        and a["zero_point"] is None
        and a["global_scale"] is None
        and _bound_is_exact(q_min, x.dtype)
        and _bound_is_exact(q_max, x.dtype)
    )


def install() -> None:
    """Register the kernel once per process (idempotent, thread-safe)."""
    global _installed
    with _lock:
        if _installed:
            return
        from compressed_tensors.utils.impl_backend import ImplBackend

        # Priority 1: after the library's Triton kernel (priority 0, CUDA only).
        ImplBackend.register("_quantize", _applies, 1)(quantize_fp8_cpu)
        _installed = True
