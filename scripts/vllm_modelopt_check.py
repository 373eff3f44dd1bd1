#!/usr/bin/env python3
"""Load a Model Optimizer FP8 checkpoint with vLLM's own code, on CPU, and report what it took.

Runs in the side environment scripts/vllm_env.sh builds (vLLM 0.32.0 --no-deps, CPU torch), never in
optjob's. It is how tests/test_cuda_compile.py checks an artifact against its real consumer:

    $(scripts/vllm_env.sh) scripts/vllm_modelopt_check.py MODEL_DIR > report.json

vLLM resolves the checkpoint's quantization from ``config.json`` (``ModelConfig``), builds the model
with that quantization config's linear and KV-cache methods (``initialize_model``), and loads the
files through the model's own ``load_weights`` (which fuses q/k/v and gate/up and remaps
``k_proj.k_scale`` to the attention's ``k_scale``). The report lists the quantization config vLLM
chose, every parameter the loader filled or left at its default, and the values vLLM holds for the
scales, so the test can compare them with the files. No forward pass: vLLM's FP8 kernels need a GPU.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

PROBED_MODULES = ("lm_head", "model.embed_tokens", "model.layers.0.self_attn.q_proj")


def main(model_dir: str) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import vllm.platforms as platforms
    from vllm.platforms.cpu import CpuPlatform

    platforms._current_platform = CpuPlatform()  # vLLM picks no platform on a host without a GPU
    import torch
    from safetensors import safe_open
    from vllm.config import DeviceConfig, LoadConfig, ModelConfig, ParallelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.model_executor.model_loader.utils import initialize_model

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dtype = json.loads((Path(model_dir) / "config.json").read_text()).get("dtype") or "auto"
    model_config = ModelConfig(model=model_dir, dtype=dtype, enforce_eager=True, seed=0)
    vllm_config = VllmConfig(
        model_config=model_config,
        parallel_config=ParallelConfig(tensor_parallel_size=1),
        device_config=DeviceConfig(device="cpu"),
        load_config=LoadConfig(),
    )
    with set_current_vllm_config(vllm_config):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{port}")  # fmt: skip
        initialize_model_parallel(tensor_model_parallel_size=1)
        torch.set_default_dtype(model_config.dtype)
        with torch.device("cpu"):
            model = initialize_model(vllm_config=vllm_config).eval()
        weights = []
        for path in sorted(Path(model_dir).glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as handle:
                weights.extend((name, handle.get_tensor(name)) for name in handle.keys())  # noqa: SIM118
        loaded = set(model.load_weights(iter(weights)))
        params = dict(model.named_parameters())
        quant = vllm_config.quant_config
        return {
            "quantization": model_config.quantization,
            "quant_config": type(quant).__name__ if quant is not None else None,
            "quant_algo": getattr(quant, "quant_method", None),
            "kv_cache_quant_algo": getattr(quant, "kv_cache_quant_method", None),
            "excluded": {name: quant.is_layer_excluded(name) for name in PROBED_MODULES},
            "params": {name: {"dtype": str(p.dtype).removeprefix("torch."), "shape": list(p.shape)}
                       for name, p in params.items()},  # fmt: skip
            "loaded": sorted(loaded),
            "not_loaded": sorted(set(params) - loaded),
            "scales": {name: p.detach().float().flatten().tolist() for name, p in params.items()
                       if name.endswith(("_scale", "k_scale", "v_scale"))},  # fmt: skip
            "fp8_weights_sum": {name: float(p.detach().float().sum()) for name, p in params.items()
                                if p.dtype == torch.float8_e4m3fn},  # fmt: skip
        }


if __name__ == "__main__":
    json.dump(main(sys.argv[1]), sys.stdout)
