"""The EAGLE-3 draft head: one Llama decoder layer over [token embedding ; fused target state].

Tensor names, shapes and semantics are those of vLLM's ``llama_eagle3.py`` and speculators'
``Eagle3DraftModel`` (no ``model.`` prefix), so the saved directory loads in both:

* ``fc`` fuses the three auxiliary target states (3H -> H); later draft steps feed back the layer's
  own pre-norm output instead;
* the layer normalizes the embedding (``input_layernorm``) and the hidden state (``hidden_norm``; with
  ``norm_before_residual`` the residual is taken after that norm), attends with q/k/v over their
  concatenation (2H wide), adds the residual, then ``post_attention_layernorm`` and the SwiGLU MLP;
* ``norm`` + ``lm_head`` give logits over the reduced draft vocabulary; ``d2t`` holds offsets
  (target id = draft id + d2t[draft id]) and ``t2d`` marks the target ids the draft can propose.

Attention of draft step ``s`` at position ``t`` (position id ``t + s``) sees step 0's keys causally
and its own chain's keys from steps 1..s: the test-time-training mask, and what vLLM's KV cache holds
when it drafts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SPECULATORS_VERSION = "0.9.0"


@dataclass(frozen=True)
class HeadConfig:
    """The draft layer's shape (copied from the target) and the flags vLLM reads."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int
    draft_vocab_size: int
    aux_layer_ids: tuple[int, ...]
    max_position_embeddings: int = 4096
    norm_before_residual: bool = True

    @classmethod
    def from_target(cls, config: Any, *, draft_vocab_size: int, aux_layer_ids: list[int]) -> HeadConfig:
        heads = int(config.num_attention_heads)
        rope = getattr(config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta") if isinstance(rope, dict) else None
        return cls(
            hidden_size=int(config.hidden_size),
            intermediate_size=int(config.intermediate_size),
            num_attention_heads=heads,
            num_key_value_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
            rms_norm_eps=float(getattr(config, "rms_norm_eps", 1e-6)),
            rope_theta=float(theta or getattr(config, "rope_theta", None) or 10000.0),
            vocab_size=int(config.vocab_size),
            draft_vocab_size=draft_vocab_size,
            aux_layer_ids=tuple(aux_layer_ids),
            max_position_embeddings=int(getattr(config, "max_position_embeddings", 4096)),
        )


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class _Attention(nn.Module):
    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        width = 2 * cfg.hidden_size
        self.cfg = cfg
        self.q_proj = nn.Linear(width, cfg.num_attention_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(width, cfg.num_key_value_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(width, cfg.num_key_value_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, bias=False)


class _MLP(nn.Module):
    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Layer(nn.Module):
    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = _Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = _MLP(cfg)


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding, rotate-half (NeoX) convention as Llama uses; ``x`` [B, heads, N, hd], positions [B, N]."""
    dim = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim))
    angles = positions.to(torch.float32)[..., None] * inv  # [B, N, hd/2]
    cos = torch.cat([angles.cos(), angles.cos()], -1)[:, None].to(x.dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1)[:, None].to(x.dtype)
    half = dim // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


@dataclass
class StepKV:
    """Keys and values of one draft step ([B, kv_heads, N, hd]); step 0's are attended causally."""

    k: torch.Tensor
    v: torch.Tensor


class Eagle3Head(nn.Module):
    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.fc = nn.Linear(len(cfg.aux_layer_ids) * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.layers = nn.ModuleList([_Layer(cfg)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(cfg.vocab_size, dtype=torch.bool))

    def step(
        self,
        tokens: torch.Tensor,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        base: StepKV | None,
        chain: list[StepKV],
    ) -> tuple[torch.Tensor, torch.Tensor, StepKV]:
        """One draft step for queries at ``positions``: returns (logits, pre-norm output, this step's K/V).

        ``base`` None means this is step 0 (attend causally over its own keys); otherwise attend to
        ``base`` causally (query i sees base keys 0..i, or all of them when there is one query at the
        end) plus each ``chain`` step's key at the same query index, plus its own.
        """
        cfg = self.cfg
        layer = self.layers[0]
        attn = layer.self_attn
        embeds = layer.input_layernorm(self.embed_tokens(tokens))
        if cfg.norm_before_residual:
            hidden = layer.hidden_norm(hidden)
            residual = hidden
        else:
            residual = hidden
            hidden = layer.hidden_norm(hidden)
        x = torch.cat([embeds, hidden], dim=-1)
        batch, n, _ = x.shape
        q = attn.q_proj(x).view(batch, n, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(batch, n, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(batch, n, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        q = _rope(q, positions, cfg.rope_theta)
        k = _rope(k, positions, cfg.rope_theta)
        own = StepKV(k, v)
        groups = cfg.num_attention_heads // cfg.num_key_value_heads
        k0, v0 = (own.k, own.v) if base is None else (base.k, base.v)
        k0, v0 = k0.repeat_interleave(groups, 1), v0.repeat_interleave(groups, 1)
        scale = 1.0 / math.sqrt(cfg.head_dim)
        scores = (q @ k0.transpose(-1, -2)) * scale  # [B, heads, n, N0]
        n0 = k0.shape[2]
        offset = n0 - n if base is not None and n == 1 else 0
        causal = torch.arange(n0, device=x.device)[None, :] <= (torch.arange(n, device=x.device)[:, None] + offset)
        scores = scores.masked_fill(~causal, float("-inf"))
        diagonal = [own] if base is not None else []
        extra_v = []
        extra_scores = []
        for kv in [*chain, *diagonal]:
            kk = kv.k.repeat_interleave(groups, 1)
            extra_scores.append(((q * kk).sum(-1, keepdim=True)) * scale)
            extra_v.append(kv.v.repeat_interleave(groups, 1))
        weights = torch.softmax(torch.cat([scores, *extra_scores], dim=-1).float(), dim=-1).to(q.dtype)
        out = weights[..., :n0] @ v0
        for i, vv in enumerate(extra_v):
            out = out + weights[..., n0 + i : n0 + i + 1] * vv
        out = out.transpose(1, 2).reshape(batch, n, cfg.num_attention_heads * cfg.head_dim)
        residual = attn.o_proj(out) + residual
        prenorm = layer.mlp(layer.post_attention_layernorm(residual)) + residual
        return self.lm_head(self.norm(prenorm)), prenorm, own

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    @torch.no_grad()
    def propose(self, tokens: torch.Tensor, aux: torch.Tensor, k: int) -> list[int]:
        """Greedy drafts (target ids) after a context: ``tokens`` [m+1] are the context ids plus the
        next token, ``aux`` [m, 3H] the target's auxiliary states of the context positions."""
        m = aux.shape[0]
        positions = torch.arange(m, device=aux.device)[None]
        logits, prenorm, base = self.step(tokens[None, 1 : m + 1], self.fc(aux[None]), positions, None, [])
        hidden = prenorm[:, -1:]
        drafts: list[int] = []
        chain: list[StepKV] = []
        for s in range(k):
            token = self.to_target_ids(logits[0, -1].argmax())
            drafts.append(int(token))
            if s == k - 1:
                break
            pos = torch.tensor([[m - 1 + s + 1]], device=aux.device)
            logits, hidden, own = self.step(token.view(1, 1), hidden, pos, base, chain)
            chain.append(own)
        return drafts


def config_dict(
    cfg: HeadConfig, *, k: int, verifier: str, verifier_architectures: list[str], dtype: str
) -> dict[str, Any]:
    """speculators' ``config.json`` for this head, every flag vLLM reads written out (no defaults relied on)."""
    layer = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": 1,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,
        "vocab_size": cfg.vocab_size,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "layer_types": ["full_attention"],
    }
    return {
        "architectures": ["Eagle3DraftModel"],
        "speculators_model_type": "eagle3",
        "speculators_version": SPECULATORS_VERSION,
        "draft_vocab_size": cfg.draft_vocab_size,
        "target_hidden_size": None,
        "eagle_aux_hidden_state_layer_ids": list(cfg.aux_layer_ids),
        "norm_before_residual": cfg.norm_before_residual,
        "norm_before_fc": False,
        "fc_norm": False,
        "norm_output": False,
        "embed_requires_grad": False,
        "tie_word_embeddings": False,
        "dtype": dtype,
        "transformer_layer_config": layer,
        "speculators_config": {
            "algorithm": "eagle3",
            "default_proposal_method": "greedy",
            "proposal_methods": [
                {"proposal_type": "greedy", "speculative_tokens": k, "accept_tolerance": 0.0, "verifier_accept_k": 1}
            ],
            "verifier": {"name_or_path": verifier, "architectures": verifier_architectures},
        },
    }


def save_head(head: Eagle3Head, out_dir: Path, config: dict[str, Any], dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, value in head.state_dict().items():
        tensors[name] = value.contiguous() if name in ("d2t", "t2d") else value.detach().to(dtype).contiguous()
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def load_head(directory: Path) -> tuple[Eagle3Head, dict[str, Any]]:
    """A saved head in float32, from its own files only (what a consumer would read)."""
    from safetensors.torch import load_file

    config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    layer = config["transformer_layer_config"]
    cfg = HeadConfig(
        hidden_size=layer["hidden_size"],
        intermediate_size=layer["intermediate_size"],
        num_attention_heads=layer["num_attention_heads"],
        num_key_value_heads=layer["num_key_value_heads"],
        head_dim=layer["head_dim"],
        rms_norm_eps=layer["rms_norm_eps"],
        rope_theta=layer["rope_parameters"]["rope_theta"],
        vocab_size=layer["vocab_size"],
        draft_vocab_size=config["draft_vocab_size"],
        aux_layer_ids=tuple(config["eagle_aux_hidden_state_layer_ids"]),
        max_position_embeddings=layer["max_position_embeddings"],
        norm_before_residual=config["norm_before_residual"],
    )
    head = Eagle3Head(cfg)
    tensors = load_file(str(directory / WEIGHTS_FILE))
    head.load_state_dict({k: (v if k in ("d2t", "t2d") else v.float()) for k, v in tensors.items()}, strict=True)
    return head.eval(), config
