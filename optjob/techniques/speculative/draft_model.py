"""Bring your own draft model (``OPTION_SPECULATIVE_DRAFT_MODEL``): fetched as safely as the source, then
checked that it can draft for the target.

A separate draft model proposes token ids that the target verifies, so the two must share the
tokenizer: the same vocabulary (every token string at the same id) and the same special tokens. The
first difference is named, because "acceptance 0 %" after an hour of serving is how a mismatch shows
up otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from optjob.errors import InputError
from optjob.runtime.cancel import CancelToken
from optjob.runtime.events import EventSink
from optjob.storage.inputs import check_model_dir
from optjob.storage.s3 import S3Settings
from optjob.storage.source import FetchedModel, fetch_model

ALLOW_PICKLE_ENV = "OPTJOB_ALLOW_PICKLE_WEIGHTS"
_SPECIAL = ("bos_token", "eos_token", "pad_token", "unk_token")


def fetch_draft(
    uri: str, dest: Path, *, settings: S3Settings | None, events: EventSink, cancel: CancelToken
) -> FetchedModel:
    """Download and check the draft model with the rules the job's source follows (no pickle, complete)."""
    fetched = fetch_model(uri, dest, settings=settings, events=events, cancel=cancel)
    try:
        check_model_dir(fetched.path, allow_pickle=os.environ.get(ALLOW_PICKLE_ENV) == "1")
    except InputError as exc:
        raise InputError(f"OPTION_SPECULATIVE_DRAFT_MODEL={uri}: {exc}") from None
    return fetched


def tokenizer_mismatch(target: Any, draft: Any) -> str | None:
    """The first difference between two tokenizers that makes drafting impossible, or None."""
    for name in _SPECIAL:
        a, b = getattr(target, name, None), getattr(draft, name, None)
        if a != b:
            return f"special token {name} is {a!r} in the target's tokenizer and {b!r} in the draft's"
    target_vocab, draft_vocab = target.get_vocab(), draft.get_vocab()
    if len(target_vocab) != len(draft_vocab):
        return f"the target's tokenizer has {len(target_vocab)} tokens and the draft's {len(draft_vocab)}"
    by_id = {index: token for token, index in draft_vocab.items()}
    for token, index in sorted(target_vocab.items(), key=lambda item: item[1]):
        if by_id.get(index) != token:
            return f"token id {index} is {token!r} in the target's tokenizer and {by_id.get(index)!r} in the draft's"
    return None


def check_compatible(uri: str, target_tokenizer: Any, draft_dir: Path, target_vocab_size: int) -> Any:
    """The draft's tokenizer, after checking it matches the target's; InputError naming the first mismatch."""
    import json

    from transformers import AutoTokenizer

    try:
        draft_tokenizer = AutoTokenizer.from_pretrained(draft_dir)
    except (OSError, ValueError) as exc:
        raise InputError(
            f"OPTION_SPECULATIVE_DRAFT_MODEL={uri} has no loadable tokenizer ({type(exc).__name__}); a draft model "
            "must ship the target's tokenizer files"
        ) from None
    problem = tokenizer_mismatch(target_tokenizer, draft_tokenizer)
    config = json.loads((draft_dir / "config.json").read_text(encoding="utf-8"))
    if problem is None and int(config.get("vocab_size", 0)) < len(target_tokenizer):
        size = config.get("vocab_size")
        problem = f"its config.json vocab_size {size} is below the tokenizer's {len(target_tokenizer)} tokens"
    if problem is None and int(config.get("vocab_size", 0)) != target_vocab_size:
        problem = f"its vocab_size {config.get('vocab_size')} differs from the target's {target_vocab_size}"
    if problem:
        raise InputError(
            f"OPTION_SPECULATIVE_DRAFT_MODEL={uri} cannot draft for this target: {problem}. A draft model must use "
            "exactly the target's tokenizer"
        )
    return draft_tokenizer


def load_draft(draft_dir: Path, device: Any, *, random_init: bool = False) -> Any:
    """The draft causal LM in float32 (or a randomly initialised one of the same shape: the floor)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if random_init:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(draft_dir), dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32)
    return model.to(device).eval()
