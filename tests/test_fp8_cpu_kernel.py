"""The CPU FP8 kernel gives compressed-tensors' bits exactly, and only takes the calls it is exact for."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization import preset_name_to_scheme
from compressed_tensors.quantization.lifecycle.forward import quantize
from compressed_tensors.quantization.utils import calculate_range
from compressed_tensors.utils.impl_backend import ImplBackend

from optjob.techniques.quantize import fp8_cpu

FP8 = torch.float8_e4m3fn


def _weights(dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(256, 384, generator=gen) * 0.05
    x[3, :7] = torch.tensor([0.0, -0.0, 1e-8, -1e-8, 5.0, -5.0, 2.0**-20])  # zeros, subnormals, outliers
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("preset", ["FP8_DYNAMIC", "FP8", "FP8_BLOCK"])
def test_bit_identical_to_the_library(preset: str, dtype: torch.dtype) -> None:
    fp8_cpu.install()
    args = preset_name_to_scheme(preset, ["Linear"]).weights
    x = _weights(dtype)
    if preset == "FP8_BLOCK":
        rows, cols = args.block_structure
        blocks = x.float().abs().reshape(x.shape[0] // rows, rows, x.shape[1] // cols, cols).amax(dim=(1, 3))
        scale = (blocks / 448).to(dtype)
    elif preset == "FP8":
        scale = (x.float().abs().amax() / 448).reshape(1).to(dtype)
    else:
        scale = (x.float().abs().amax(dim=1, keepdim=True) / 448).to(dtype)
    scale = scale * 0.5  # push values past the range so the clamp matters

    # quantize() dispatches through the registry: to our kernel once installed, to the library without it.
    ours = quantize(x=x, scale=scale, zero_point=None, args=args, dtype=FP8)
    with _kernel_disabled():
        theirs = quantize(x=x, scale=scale, zero_point=None, args=args, dtype=FP8)
    calls = _count_calls()
    with calls:
        quantize(x=x, scale=scale, zero_point=None, args=args, dtype=FP8)
    assert calls.count == 1  # our kernel really ran
    assert ours.dtype == FP8 and ours.shape == x.shape
    assert torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8))
    assert float(ours.float().abs().max()) == 448.0  # saturated, not NaN


def test_the_kernel_is_what_runs_and_is_installed_once() -> None:
    fp8_cpu.install()
    fp8_cpu.install()
    entries = [fn for fn, _, _ in ImplBackend._backends["_quantize"] if fn is fp8_cpu.quantize_fp8_cpu]
    assert len(entries) == 1
    args = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"]).weights
    x = _weights(torch.bfloat16)
    q_min, q_max = calculate_range(args, x.device)
    scale = torch.full((x.shape[0], 1), 0.01, dtype=torch.bfloat16)
    assert fp8_cpu._applies(x, scale, None, q_min, q_max, args, FP8)


@pytest.mark.parametrize(
    "change",
    ["int8 weights", "no target dtype", "zero point", "global scale", "fp8 source"],
)
def test_calls_it_is_not_exact_for_go_to_the_library(change: str) -> None:
    args = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"]).weights
    x = _weights(torch.bfloat16)
    scale = torch.full((x.shape[0], 1), 0.01, dtype=torch.bfloat16)
    q_min, q_max = calculate_range(args, x.device)
    call = {"x": x, "scale": scale, "zero_point": None, "q_min": q_min, "q_max": q_max, "args": args, "dtype": FP8}
    if change == "int8 weights":
        call["args"] = preset_name_to_scheme("W8A8", ["Linear"]).weights
        call["dtype"] = torch.int8
    elif change == "no target dtype":
        call["dtype"] = None
    elif change == "zero point":
        call["zero_point"] = torch.zeros_like(scale)
    elif change == "global scale":
        call["global_scale"] = torch.ones(1)
    elif change == "fp8 source":
        call["x"] = x.to(FP8)
    assert not fp8_cpu._applies(**call)


class _kernel_disabled:
    """Take our kernel out of the registry for a block and put it back."""

    def __enter__(self) -> None:
        self.saved = list(ImplBackend._backends.get("_quantize", []))
        ImplBackend._backends["_quantize"] = [e for e in self.saved if e[0] is not fp8_cpu.quantize_fp8_cpu]

    def __exit__(self, *exc: object) -> None:
        ImplBackend._backends["_quantize"] = self.saved


class _count_calls:
    """Count the registry's calls to our kernel within a block."""

    def __enter__(self) -> _count_calls:
        self.count = 0
        self.saved = list(ImplBackend._backends["_quantize"])

        def counted(*args: object, **kwargs: object) -> torch.Tensor:
            self.count += 1
            return fp8_cpu.quantize_fp8_cpu(*args, **kwargs)

        ImplBackend._backends["_quantize"] = [
            (counted, req, prio) if fn is fp8_cpu.quantize_fp8_cpu else (fn, req, prio) for fn, req, prio in self.saved
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        ImplBackend._backends["_quantize"] = self.saved
