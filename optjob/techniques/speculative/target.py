"""The target model as the draft sees it: auxiliary hidden states, the final pre-norm state, greedy ids.

EAGLE-3 fuses three of the target's intermediate states. vLLM's layer id ``i`` (for ``i`` below the
layer count) is the residual stream *entering* decoder layer ``i``; the training target uses the last
layer's output *before* the final norm (transformers' ``hidden_states[-1]`` is after it). Both are taken
with forward pre-hooks (on ``layers[i]`` and on the final norm), so only the states needed are kept.

The ids are pinned explicitly in the draft's config: vLLM's default ``(2, L//2, L-3)`` collapses on
shallow models (4 layers give 2, 2, 1), so when it is not three distinct increasing ids, evenly
spaced distinct ones are used instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from optjob.errors import InputError


def aux_layer_ids(num_layers: int) -> list[int]:
    """Three distinct, increasing layer ids for the fused features (vLLM's default where it is distinct)."""
    if num_layers < 3:
        raise InputError(f"EAGLE-3 fuses three decoder layers' states; this target has only {num_layers} layers")
    default = [2, num_layers // 2, num_layers - 3]
    if default[0] < default[1] < default[2]:
        return default
    spread = sorted({round(1 + i * (num_layers - 2) / 2) for i in range(3)})
    return spread if len(spread) == 3 else [num_layers - 3, num_layers - 2, num_layers - 1]


@dataclass
class TargetOutput:
    """One forward: logits, fused-feature inputs ``aux`` [B, T, 3H] and pre-norm last states ``last`` [B, T, H]."""

    logits: torch.Tensor
    aux: torch.Tensor
    last: torch.Tensor


class Target:
    """A loaded target with hooks on the layers EAGLE-3 reads."""

    def __init__(self, model: Any, aux_ids: list[int], device: torch.device) -> None:
        self.model = model
        self.aux_ids = aux_ids
        self.device = device
        self.config = model.config
        base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
        layers = getattr(base, "layers", None)
        norm = getattr(base, "norm", None)
        architecture = ", ".join(getattr(self.config, "architectures", None) or [type(model).__name__])
        if not isinstance(layers, torch.nn.ModuleList) or norm is None or model.get_output_embeddings() is None:
            raise InputError(
                f"The EAGLE-3 trainer cannot hook {architecture}: it reads the decoder layers at <model>.layers, the "
                "final norm at <model>.norm and the LM head, as Llama, Mistral and Qwen models lay them out. Use a "
                "draft model you trained (OPTION_SPECULATIVE_DRAFT_MODEL) for this architecture"
            )
        if getattr(self.config, "final_logit_softcapping", None):
            raise InputError(
                f"{architecture} soft-caps its logits, which the EAGLE-3 head's vocabulary projection does not model; "
                "use OPTION_SPECULATIVE_DRAFT_MODEL for this architecture"
            )
        self.norm = norm
        self.lm_head = model.get_output_embeddings()
        self.embed = model.get_input_embeddings()
        self._captured: dict[int, torch.Tensor] = {}
        for index in aux_ids:
            layers[index].register_forward_pre_hook(self._capture(index), with_kwargs=True)
        norm.register_forward_pre_hook(self._capture(-1), with_kwargs=True)

    def _capture(self, key: int) -> Callable[..., None]:
        def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self._captured[key] = args[0] if args else kwargs["hidden_states"]

        return hook

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.lm_head.weight.shape[0])

    @torch.no_grad()
    def forward(
        self, input_ids: torch.Tensor, *, cache: Any = None, attention_mask: torch.Tensor | None = None
    ) -> TargetOutput:
        self._captured.clear()
        out = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=None if attention_mask is None else attention_mask.to(self.device),
            past_key_values=cache,
            use_cache=cache is not None,
        )
        aux = torch.cat([self._captured[i] for i in self.aux_ids], dim=-1)
        return TargetOutput(out.logits.float(), aux.float(), self._captured[-1].float())

    @torch.no_grad()
    def teacher_logits(self, last: torch.Tensor, vocab_ids: torch.Tensor) -> torch.Tensor:
        """The target's logits over the draft vocabulary from its pre-norm last states."""
        weight = self.lm_head.weight[vocab_ids.to(self.device)].float()
        return self.norm(last.to(self.norm.weight.dtype)).float() @ weight.T

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], *, max_new_tokens: list[int], pad_id: int, eos_ids: set[int]
    ) -> list[list[int]]:
        """Greedy continuations of a batch of prompts (left-padded), ids kept as generated."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        out = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            do_sample=False,
            max_new_tokens=max(max_new_tokens),
            pad_token_id=pad_id,
            eos_token_id=sorted(eos_ids) or None,
        )
        replies = []
        for row, limit in enumerate(max_new_tokens):
            reply = []
            for token in out[row, width:].tolist()[:limit]:
                reply.append(int(token))
                if token in eos_ids:
                    break
            replies.append(reply)
        return replies


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_target(model_dir: Path, aux_ids: list[int] | None = None) -> Target:
    """The target in float32 on this host's device, hooked at ``aux_ids`` (chosen from its depth if None)."""
    from transformers import AutoModelForCausalLM

    where = device()
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    except (ValueError, OSError, KeyError, ImportError) as exc:
        raise InputError(
            f"transformers cannot load the target for speculative decoding: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    model.to(where).eval()
    layers = int(model.config.num_hidden_layers)
    return Target(model, aux_ids or aux_layer_ids(layers), where)


def eos_ids(model_dir: Path, tokenizer: Any) -> set[int]:
    """Every id that ends a reply: the tokenizer's EOS and generation_config's (which may list several)."""
    import json

    ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    path = model_dir / "generation_config.json"
    if path.is_file():
        value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        ids |= {int(v) for v in (value if isinstance(value, list) else [value]) if v is not None}
    return ids
