"""Training an EAGLE-3 head online from the target's forward passes.

Hidden states are never written to disk (for real models they are tens of KiB per token, terabytes
per dataset). Each batch's target features are computed inside the training loop; while they fit
``feature_cache_mib`` they are kept in memory (bfloat16) for later epochs, beyond it they are
recomputed, so the cost is bounded in memory and disk and only grows in time.

Alignment (speculators' and vLLM's): at draft step ``s`` position ``t`` reads the token
``x[t+1+s]`` and (step 0) the fused target state at ``t`` or (later steps) its own previous output,
and learns the target's distribution at ``t+1+s`` over the draft vocabulary (forward KL), counted
only where the token it predicts, ``x[t+2+s]``, belongs to a reply.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import functional as F

from optjob.runtime.cancel import CancelToken
from optjob.runtime.events import EventSink
from optjob.techniques.speculative.eagle3 import Eagle3Head, HeadConfig, StepKV
from optjob.techniques.speculative.params import TrainerRules
from optjob.techniques.speculative.target import Target

STAGE = "SpeculativeDecoding"


@dataclass(frozen=True)
class Sample:
    """One training sequence: prompt + reply ids, and which ids are reply (supervised) tokens."""

    ids: list[int]
    reply_mask: list[bool]


@dataclass(frozen=True)
class DraftVocab:
    ids: torch.Tensor  # sorted target ids the draft can propose
    coverage: float  # share of supervised tokens inside it


def choose_draft_vocab(samples: list[Sample], vocab_size: int, rules: TrainerRules) -> DraftVocab:
    """The most frequent supervised tokens, padded to a multiple of ``draft_vocab_multiple`` with the next ids."""
    counts: Counter[int] = Counter(t for s in samples for t, m in zip(s.ids, s.reply_mask, strict=True) if m)
    multiple = rules.draft_vocab_multiple
    size = min(vocab_size, rules.max_draft_vocab, max(multiple, math.ceil(len(counts) / multiple) * multiple))
    chosen = [token for token, _ in counts.most_common(size)]
    taken = set(chosen)
    filler = (t for t in range(vocab_size) if t not in taken)
    while len(chosen) < size:
        chosen.append(next(filler))
    total = sum(counts.values()) or 1
    covered = sum(counts[t] for t in chosen)
    return DraftVocab(torch.tensor(sorted(chosen), dtype=torch.long), covered / total)


def init_head(target: Target, vocab: DraftVocab, aux_ids: list[int], seed: int) -> Eagle3Head:
    """A fresh head: random layer and ``fc``, the target's embedding (frozen) and its LM-head rows."""
    torch.manual_seed(seed)
    cfg = HeadConfig.from_target(target.config, draft_vocab_size=len(vocab.ids), aux_layer_ids=aux_ids)
    head = Eagle3Head(cfg)
    with torch.no_grad():
        head.embed_tokens.weight.copy_(target.embed.weight.float().cpu())
        head.lm_head.weight.copy_(target.lm_head.weight[vocab.ids.to(target.device)].float().cpu())
        head.d2t.copy_(vocab.ids - torch.arange(len(vocab.ids)))
        head.t2d.zero_()
        head.t2d[vocab.ids] = True
    head.embed_tokens.weight.requires_grad_(False)
    return head


@dataclass
class _Features:
    aux: torch.Tensor  # [B, T, 3H]
    last: torch.Tensor  # [B, T, H]


@dataclass
class TrainReport:
    steps: int = 0
    epochs: int = 0
    tokens: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    step_accuracy: list[float] = field(default_factory=list)
    feature_cache_batches: int = 0
    recomputed_batches: int = 0
    device: str = "cpu"

    def as_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "epochs": self.epochs,
            "supervised_tokens_per_epoch": self.tokens,
            "seconds": round(self.seconds, 1),
            "first_loss": round(self.losses[0], 4) if self.losses else None,
            "final_loss": round(sum(self.losses[-10:]) / max(1, len(self.losses[-10:])), 4) if self.losses else None,
            "final_step_accuracy": [round(a, 3) for a in self.step_accuracy],
            "feature_cache_batches": self.feature_cache_batches,
            "recomputed_batches": self.recomputed_batches,
            "device": self.device,
        }


def _batch(samples: list[Sample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(s.ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.bool)
    valid = torch.zeros((len(samples), width), dtype=torch.long)
    for row, sample in enumerate(samples):
        ids[row, : len(sample.ids)] = torch.tensor(sample.ids)
        mask[row, : len(sample.ids)] = torch.tensor(sample.reply_mask)
        valid[row, : len(sample.ids)] = 1
    return ids, mask, valid


def ttt_loss(
    head: Eagle3Head,
    target: Target,
    ids: torch.Tensor,
    reply: torch.Tensor,
    feats: _Features,
    vocab_ids: torch.Tensor,
    steps: int,
) -> tuple[torch.Tensor, list[float], int]:
    """Summed forward KL over ``steps`` unrolled draft steps; also each step's top-1 accuracy."""
    dev = feats.aux.device
    batch, width = ids.shape
    n = width - 1
    padded = torch.cat([ids, torch.zeros((batch, steps + 1), dtype=torch.long)], dim=1).to(dev)
    reply = torch.cat([reply, torch.zeros((batch, steps + 2), dtype=torch.bool)], dim=1).to(dev)
    last = torch.cat([feats.last, feats.last.new_zeros((batch, steps + 1, feats.last.shape[-1]))], dim=1)
    positions = torch.arange(n, device=dev)[None].expand(batch, n)
    hidden = head.fc(feats.aux[:, :n].float())
    base: StepKV | None = None
    chain: list[StepKV] = []
    total = torch.zeros((), device=dev)
    accuracy = []
    supervised = 0
    for s in range(steps):
        tokens = padded[:, 1 + s : 1 + s + n]
        logits, hidden, own = head.step(tokens, hidden, positions + s, base, chain)
        if base is None:
            base = own
        else:
            chain.append(own)
        keep = reply[:, 2 + s : 2 + s + n]
        if not keep.any():
            continue
        teacher = target.teacher_logits(last[:, 1 + s : 1 + s + n][keep], vocab_ids)
        student = logits[keep].float()
        log_p = F.log_softmax(teacher, -1)
        loss = F.kl_div(F.log_softmax(student, -1), log_p, log_target=True, reduction="batchmean")
        total = total + loss
        accuracy.append(float((student.argmax(-1) == teacher.argmax(-1)).float().mean()))
        supervised = supervised or int(keep.sum())
    return total, accuracy, supervised


def train_head(
    head: Eagle3Head,
    target: Target,
    samples: list[Sample],
    vocab: DraftVocab,
    *,
    epochs: int,
    rules: TrainerRules,
    pad_id: int,
    events: EventSink,
    cancel: CancelToken,
) -> TrainReport:
    """Train ``head`` in place; checks for cancellation after every optimizer step."""
    dev = target.device
    head.to(dev).train()
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=rules.learning_rate, weight_decay=0.0)
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].ids))  # similar lengths batch together
    batches = [order[i : i + rules.batch_size] for i in range(0, len(order), rules.batch_size)]
    total_steps = max(1, len(batches) * epochs)
    warmup = max(1, int(total_steps * rules.warmup_fraction))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total_steps))),
    )
    rng = random.Random(rules.seed)
    cache: dict[tuple[int, ...], _Features] = {}
    budget = rules.feature_cache_mib * 2**20
    used = 0
    report = TrainReport(device=str(dev))
    vocab_ids = vocab.ids.to(dev)
    started = time.monotonic()
    report.tokens = sum(sum(s.reply_mask) for s in samples)
    for epoch in range(epochs):
        rng.shuffle(batches)
        for batch in batches:
            cancel.raise_if_cancelled()
            ids, reply, valid = _batch([samples[i] for i in batch], pad_id)
            key = tuple(batch)
            feats = cache.get(key)
            if feats is None:
                out = target.forward(ids, attention_mask=valid)
                feats = _Features(out.aux, out.last)
                size = (out.aux.numel() + out.last.numel()) * 2
                if used + size <= budget:
                    cache[key] = _Features(out.aux.to(torch.bfloat16), out.last.to(torch.bfloat16))
                    used += size
                    report.feature_cache_batches += 1
                elif epoch:
                    report.recomputed_batches += 1
            loss, accuracy, _ = ttt_loss(head, target, ids, reply, feats, vocab_ids, rules.ttt_steps)
            if loss.requires_grad:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
            scheduler.step()
            report.steps += 1
            report.losses.append(float(loss.detach()))
            report.step_accuracy = accuracy or report.step_accuracy
            if report.steps % 10 == 0 or report.steps == total_steps:
                events(
                    STAGE,
                    "train",
                    report.steps / total_steps,
                    f"epoch {epoch + 1}/{epochs} step {report.steps}/{total_steps} loss {report.losses[-1]:.3f} "
                    f"top-1 per draft step {', '.join(f'{a:.2f}' for a in accuracy)}",
                    loss=round(report.losses[-1], 4),
                )
        report.epochs = epoch + 1
    report.seconds = time.monotonic() - started
    head.eval()
    return report
