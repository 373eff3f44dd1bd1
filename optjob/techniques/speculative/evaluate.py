"""Offline greedy speculative decoding: the number a user can trust, measured before anything is published.

Per round the drafter proposes ``k`` tokens, one target forward scores the next token plus the
drafts (with the target's KV cache, cropped back to the accepted length after each round), the
longest prefix equal to the target's own argmax is accepted and the target's next token is appended.
That forward also yields the auxiliary states of the accepted positions for the next round (exact,
because attention is causal), as vLLM does. Every prompt is also decoded plainly (greedy, one token
per forward), and the two outputs must be identical: a mismatch means the drafting path changed the
output, which is a bug, never a trade-off.

Figures (vLLM's definitions): acceptance rate = accepted / proposed drafts; mean accepted length =
1 + accepted drafts per round (tokens per target forward in the steady state); per-position
acceptance = P(draft j accepted).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from optjob.runtime.cancel import CancelToken
from optjob.runtime.events import EventSink
from optjob.techniques.speculative.target import Target

STAGE = "SpeculativeDecoding"


class Proposer(Protocol):
    def propose(self, tokens: torch.Tensor, aux: torch.Tensor, k: int) -> list[int]:
        """Up to ``k`` draft ids after ``tokens`` (context + next token); ``aux`` [len(context), 3H]."""
        ...


class DraftModelProposer:
    """A separate small causal LM with the target's tokenizer, drafting greedily from the token ids alone."""

    def __init__(self, model: Any) -> None:
        self.model = model

    @torch.no_grad()
    def propose(self, tokens: torch.Tensor, aux: torch.Tensor, k: int) -> list[int]:
        dev = next(self.model.parameters()).device
        out = self.model.generate(
            input_ids=tokens[None].to(dev), do_sample=False, max_new_tokens=k, min_new_tokens=k, pad_token_id=0
        )
        return [int(t) for t in out[0, tokens.shape[0] :].tolist()]


@dataclass
class Figures:
    k: int
    prompts: int = 0
    rounds: int = 0
    proposed: int = 0
    accepted: int = 0
    generated: int = 0
    per_position: list[int] = field(default_factory=list)
    lossless: int = 0
    mismatches: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        rounds = max(1, self.rounds)
        return {
            "k": self.k,
            "prompts": self.prompts,
            "rounds": self.rounds,
            "acceptance_rate": round(self.accepted / max(1, self.proposed), 4),
            "mean_accepted_length": round(1 + self.accepted / rounds, 4),
            "per_position_acceptance": [round(c / rounds, 4) for c in self.per_position],
            "tokens_per_target_forward": round(self.generated / max(1, self.rounds + self.prompts), 4),
            "lossless": f"{self.lossless}/{self.prompts}",
            "mismatches": self.mismatches[:3],
            "seconds": round(self.seconds, 1),
        }


@torch.no_grad()
def greedy(target: Target, prompt: list[int], new_tokens: int, eos: set[int]) -> list[int]:
    """Plain greedy decoding, one token per target forward: the reference output."""
    from transformers import DynamicCache

    cache = DynamicCache(config=target.config)
    logits = target.forward(torch.tensor([prompt]), cache=cache).logits
    out: list[int] = []
    while True:
        token = int(logits[0, -1].argmax())
        out.append(token)
        if len(out) >= new_tokens or token in eos:
            return out
        logits = target.forward(torch.tensor([[token]]), cache=cache).logits


@torch.no_grad()
def speculative(
    target: Target, proposer: Proposer, prompt: list[int], new_tokens: int, k: int, eos: set[int], figures: Figures
) -> list[int]:
    """Greedy speculative decoding of one prompt; adds its rounds to ``figures``."""
    from transformers import DynamicCache

    cache = DynamicCache(config=target.config)
    first = target.forward(torch.tensor([prompt]), cache=cache)
    aux = first.aux[0]
    tokens = list(prompt)
    out = [int(first.logits[0, -1].argmax())]
    while len(out) < new_tokens and out[-1] not in eos:
        context = torch.tensor(tokens + [out[-1]], device=aux.device)
        drafts = proposer.propose(context, aux, k)[:k]
        verify = target.forward(torch.tensor([[out[-1], *drafts]]), cache=cache)
        predicted = verify.logits[0].argmax(-1).tolist()
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == predicted[accepted]:
            accepted += 1
        figures.rounds += 1
        figures.proposed += len(drafts)
        figures.accepted += accepted
        if len(figures.per_position) < k:
            figures.per_position.extend([0] * (k - len(figures.per_position)))
        for j in range(accepted):
            figures.per_position[j] += 1
        tokens.append(out[-1])
        tokens.extend(drafts[:accepted])
        aux = torch.cat([aux, verify.aux[0, : 1 + accepted]], dim=0)
        rejected = cache.get_seq_length() - len(tokens)
        if rejected > 0:
            cache.crop(-rejected)
        new = [*drafts[:accepted], int(predicted[accepted])]
        for token in new:
            out.append(int(token))
            if len(out) >= new_tokens or token in eos:
                break
    return out


def reference_outputs(
    target: Target, prompts: list[list[int]], new_tokens: int, eos: set[int], *, events: EventSink, cancel: CancelToken
) -> tuple[list[list[int]], float]:
    started = time.monotonic()
    outputs = []
    for index, prompt in enumerate(prompts):
        cancel.raise_if_cancelled()
        outputs.append(greedy(target, prompt, new_tokens, eos))
        events(STAGE, "evaluate", None, f"plain greedy reference {index + 1}/{len(prompts)}")
    return outputs, time.monotonic() - started


def measure(
    target: Target,
    proposer: Proposer,
    prompts: list[list[int]],
    references: list[list[int]],
    *,
    k: int,
    new_tokens: int,
    eos: set[int],
    label: str,
    events: EventSink,
    cancel: CancelToken,
    decode: Callable[..., list[int]] = speculative,
) -> Figures:
    """Acceptance figures of ``proposer`` over ``prompts``; every output compared with its plain greedy one."""
    figures = Figures(k=k, per_position=[0] * k)
    started = time.monotonic()
    for index, (prompt, reference) in enumerate(zip(prompts, references, strict=True)):
        cancel.raise_if_cancelled()
        output = decode(target, proposer, prompt, new_tokens, k, eos, figures)
        figures.prompts += 1
        figures.generated += len(output)
        if output == reference:
            figures.lossless += 1
        else:
            at = next((i for i, (a, b) in enumerate(zip(output, reference, strict=False)) if a != b), None)
            at = at if at is not None else min(len(output), len(reference))
            figures.mismatches.append({"prompt": index, "first_difference_at": at})
        events(
            STAGE,
            "evaluate",
            (index + 1) / len(prompts),
            f"{label}: prompt {index + 1}/{len(prompts)}, mean accepted length "
            f"{1 + figures.accepted / max(1, figures.rounds):.2f} at k={k}",
        )
    figures.seconds = time.monotonic() - started
    return figures
