"""NVFP4 as the serving kernels read it: decoding Model Optimizer's packed weights, rounding activations.

The unified checkpoint stores an NVFP4 weight as ``weight`` uint8 [out, in / 2] (two E2M1 codes per
byte, the even input column in the low nibble), ``weight_scale`` float8 E4M3 [out, in / 16] (one
scale per block of 16 inputs) and ``weight_scale_2`` float32 (one per tensor): the value is
``code * weight_scale * weight_scale_2``. Activations are quantized the same way at run time, per
block of 16, with the checkpoint's static per-tensor ``input_scale`` in the role of
``weight_scale_2``. This follows vLLM's NVFP4 emulation (``break_fp4_bytes``, low nibble first,
bit 3 the sign) and Model Optimizer's ``NVFP4QTensor``.
"""

from __future__ import annotations

import torch

BLOCK = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_MIDPOINTS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, n] -> float32 [rows, 2n], low nibble first."""
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1).long()
    values = _E2M1[codes & 0x07]
    return torch.where((codes & 0x08) != 0, -values, values)


def dequantize_weight(packed: torch.Tensor, block_scale: torch.Tensor, tensor_scale: torch.Tensor) -> torch.Tensor:
    values = unpack_e2m1(packed)
    rows, columns = values.shape
    scales = block_scale.float().reshape(rows, columns // BLOCK, 1) * tensor_scale.float()
    return (values.reshape(rows, columns // BLOCK, BLOCK) * scales).reshape(rows, columns)


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Each value to the nearest E2M1 value (magnitudes above 6 saturate)."""
    magnitude = _E2M1[torch.bucketize(x.abs(), _MIDPOINTS)]
    return torch.where(x < 0, -magnitude, magnitude)


def fake_quantize_activation(x: torch.Tensor, tensor_scale: torch.Tensor) -> torch.Tensor:
    """``x`` rounded as the NVFP4 GEMM sees it: per block of 16 along the last dimension, an E4M3 block
    scale relative to the static per-tensor ``tensor_scale`` (the checkpoint's ``input_scale``)."""
    shape, dtype = x.shape, x.dtype
    blocks = x.float().reshape(-1, BLOCK)
    scale = tensor_scale.float()
    block = (blocks.abs().amax(dim=1, keepdim=True) / E2M1_MAX / scale).clamp(max=E4M3_MAX)
    block = block.to(torch.float8_e4m3fn).float() * scale
    block = torch.where(block == 0, torch.ones_like(block), block)
    return (round_e2m1(blocks / block) * block).reshape(shape).to(dtype)
