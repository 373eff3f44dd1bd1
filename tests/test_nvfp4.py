"""optjob's NVFP4 decoding and activation rounding (optjob/verify/nvfp4.py) against Model Optimizer's own."""

from __future__ import annotations

import pytest
import torch

from optjob.verify import nvfp4


@pytest.mark.parametrize("spread", [0.01, 3.0, 200.0])
def test_decoding_and_activation_rounding_match_model_optimizers_nvfp4_tensor(spread: float) -> None:
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    torch.manual_seed(0)
    x = torch.randn(32, 128) * spread
    x[0, :16] = 0.0  # an all-zero block
    global_scale = x.abs().max() / (nvfp4.E2M1_MAX * nvfp4.E4M3_MAX)
    packed, block, tensor_scale = NVFP4QTensor.quantize(x, 16, weights_scaling_factor_2=global_scale)
    theirs = packed.dequantize(dtype=torch.float32, scale=block, double_scale=tensor_scale, block_sizes={-1: 16})
    assert packed._quantized_data.shape == (32, 64) and block.dtype == torch.float8_e4m3fn
    assert torch.equal(nvfp4.dequantize_weight(packed._quantized_data, block, tensor_scale), theirs)
    assert torch.equal(nvfp4.fake_quantize_activation(x, global_scale), theirs)
    assert float((theirs - x).norm() / x.norm()) < 0.12


def test_e2m1_rounding_and_unpacking() -> None:
    values = torch.tensor([0.2, 0.26, -0.74, 1.3, 2.4, 2.6, 4.9, 5.1, 7.0, -100.0])
    assert nvfp4.round_e2m1(values).tolist() == [0.0, 0.5, -0.5, 1.5, 2.0, 3.0, 4.0, 6.0, 6.0, -6.0]
    packed = torch.tensor([[0x91, 0x7F]], dtype=torch.uint8)  # low nibble first; bit 3 of each nibble the sign
    assert nvfp4.unpack_e2m1(packed).tolist() == [[0.5, -0.5, -6.0, 6.0]]
