"""An EAGLE-3 drafter written from vLLM's ``llama_eagle3.py`` semantics, independent of optjob's trainer.

It reads a published ``speculator/`` directory with nothing but safetensors and json, and decodes the
way vLLM does: the target's auxiliary states are transformers' ``output_hidden_states[i]`` (the input
of decoder layer ``i``); the draft keeps one growing sequence of entries (the context positions with
their fused target states, then one entry per draft step at the next position) and runs its single
decoder layer with plain causal attention over all of them, recomputed from scratch every step (no
cache, no masks beyond causal). Tokens map through ``d2t`` offsets. optjob's module uses a KV layout
with a diagonal chain instead; the two must agree on every draft.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotate(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    dim = x.shape[-1]
    freqs = pos[:, None].double() / (theta ** (torch.arange(0, dim, 2).double() / dim))[None]
    cos, sin = freqs.cos().float(), freqs.sin().float()
    first, second = x[..., : dim // 2], x[..., dim // 2 :]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


class ReferenceEagle3:
    def __init__(self, directory: Path) -> None:
        self.config = json.loads((directory / "config.json").read_text())
        self.w = {
            k: (v if k in ("d2t", "t2d") else v.float())
            for k, v in load_file(str(directory / "model.safetensors")).items()
        }
        layer = self.config["transformer_layer_config"]
        self.heads = layer["num_attention_heads"]
        self.kv_heads = layer["num_key_value_heads"]
        self.head_dim = layer["head_dim"]
        self.eps = layer["rms_norm_eps"]
        self.theta = layer["rope_parameters"]["rope_theta"]
        self.before_residual = self.config["norm_before_residual"]
        self.aux_ids = self.config["eagle_aux_hidden_state_layer_ids"]

    def _layer(self, embeds: torch.Tensor, hidden: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One pass of the draft layer over entries [N]: returns the pre-norm outputs [N, H]."""
        w, p = self.w, "layers.0."
        e = _rms(embeds, w[p + "input_layernorm.weight"], self.eps)
        if self.before_residual:
            hidden = _rms(hidden, w[p + "hidden_norm.weight"], self.eps)
            residual = hidden
        else:
            residual = hidden
            hidden = _rms(hidden, w[p + "hidden_norm.weight"], self.eps)
        x = torch.cat([e, hidden], -1)
        n = x.shape[0]
        q = (x @ w[p + "self_attn.q_proj.weight"].T).view(n, self.heads, self.head_dim)
        k = (x @ w[p + "self_attn.k_proj.weight"].T).view(n, self.kv_heads, self.head_dim)
        v = (x @ w[p + "self_attn.v_proj.weight"].T).view(n, self.kv_heads, self.head_dim)
        q = torch.stack([_rotate(q[:, h], pos, self.theta) for h in range(self.heads)], 1)
        k = torch.stack([_rotate(k[:, h], pos, self.theta) for h in range(self.kv_heads)], 1)
        group = self.heads // self.kv_heads
        out = torch.zeros(n, self.heads, self.head_dim)
        causal = torch.ones(n, n).tril().bool()
        for h in range(self.heads):
            scores = (q[:, h] @ k[:, h // group].T) / self.head_dim**0.5
            out[:, h] = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ v[:, h // group]
        residual = out.reshape(n, -1) @ w[p + "self_attn.o_proj.weight"].T + residual
        normed = _rms(residual, w[p + "post_attention_layernorm.weight"], self.eps)
        gate = torch.nn.functional.silu(normed @ w[p + "mlp.gate_proj.weight"].T)
        mlp = (gate * (normed @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
        return mlp + residual

    def _token(self, prenorm: torch.Tensor) -> int:
        logits = _rms(prenorm, self.w["norm.weight"], self.eps) @ self.w["lm_head.weight"].T
        draft = int(logits.argmax())
        return draft + int(self.w["d2t"][draft])

    @torch.no_grad()
    def propose(self, tokens: list[int], aux: torch.Tensor, k: int) -> list[int]:
        """``tokens`` = context + next token; ``aux`` [len(context), 3H] from the target."""
        m = aux.shape[0]
        ids = list(tokens[1 : m + 1])
        hidden = list((aux @ self.w["fc.weight"].T).unbind(0))
        drafts: list[int] = []
        for step in range(k):
            n = len(ids)
            out = self._layer(self.w["embed_tokens.weight"][torch.tensor(ids)], torch.stack(hidden), torch.arange(n))
            drafts.append(self._token(out[-1]))
            ids.append(drafts[-1])
            hidden.append(out[-1])
            if step == k - 1:
                break
        return drafts


@torch.no_grad()
def replay(
    model: Any, drafter: ReferenceEagle3, prompts: list[list[int]], k: int, new_tokens: int, eos: set[int]
) -> dict[str, Any]:
    """Greedy speculative decoding with full recomputation of the target every round (no cache)."""
    proposed = accepted = rounds = 0
    per_position = [0] * k
    for prompt in prompts:
        tokens = list(prompt)
        out = model(torch.tensor([tokens]), output_hidden_states=True)
        generated = [int(out.logits[0, -1].argmax())]
        while len(generated) < new_tokens and generated[-1] not in eos:
            states = out.hidden_states
            aux = torch.cat([states[i][0] for i in drafter.aux_ids], -1)
            drafts = drafter.propose(tokens + [generated[-1]], aux, k)
            candidate = tokens + [generated[-1]] + drafts
            out = model(torch.tensor([candidate]), output_hidden_states=True)
            predicted = out.logits[0, len(tokens) :].argmax(-1).tolist()
            n = 0
            while n < len(drafts) and drafts[n] == predicted[n]:
                n += 1
            rounds, proposed, accepted = rounds + 1, proposed + len(drafts), accepted + n
            for j in range(n):
                per_position[j] += 1
            tokens = tokens + [generated[-1]] + drafts[:n]
            out = model(torch.tensor([tokens]), output_hidden_states=True)
            for token in [*drafts[:n], predicted[n]]:
                generated.append(int(token))
                if len(generated) >= new_tokens or token in eos:
                    break
    return {
        "rounds": rounds,
        "acceptance_rate": round(accepted / max(1, proposed), 4),
        "mean_accepted_length": round(1 + accepted / max(1, rounds), 4),
        "per_position_acceptance": [round(c / max(1, rounds), 4) for c in per_position],
    }
