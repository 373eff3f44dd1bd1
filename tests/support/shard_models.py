"""Tiny random Hugging Face checkpoints of each shardable architecture, with awkward geometry.

The vocabulary (500) is not a multiple of vLLM's padding (64), KV heads (2) are fewer than the
largest degree tested (so they are replicated), and the weights are split over several
safetensors shards so tensors of one layer can lie in different files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SHAPES: dict[str, dict[str, Any]] = {
    # name: (transformers config class, model class, extra config)
    "llama": {"config": "LlamaConfig", "model": "LlamaForCausalLM", "extra": {}},
    "llama-bias": {
        "config": "LlamaConfig",
        "model": "LlamaForCausalLM",
        "extra": {"attention_bias": True, "mlp_bias": True},
    },
    "mistral": {"config": "MistralConfig", "model": "MistralForCausalLM", "extra": {}},
    "qwen2": {"config": "Qwen2Config", "model": "Qwen2ForCausalLM", "extra": {}},
    "qwen3": {"config": "Qwen3Config", "model": "Qwen3ForCausalLM", "extra": {"head_dim": 16}},
}


def build_model(
    kind: str,
    out: Path,
    *,
    vocab: int = 500,
    hidden: int = 64,
    heads: int = 8,
    kv_heads: int = 2,
    layers: int = 2,
    intermediate: int = 128,
    tied: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: str = "60KB",
    **extra: Any,
) -> Path:
    import transformers

    spec = SHAPES[kind]
    config = getattr(transformers, spec["config"])(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tied,
        **{**spec["extra"], **extra},
    )  # fmt: skip
    torch.manual_seed(0)
    model = getattr(transformers, spec["model"])(config).to(dtype)
    with torch.no_grad():  # non-trivial norms and biases, so a misplaced one cannot hide
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                param.copy_(torch.randn_like(param))
    model.config.dtype = str(dtype).removeprefix("torch.")
    model.save_pretrained(out, max_shard_size=max_shard_size)
    return out
