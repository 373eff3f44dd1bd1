"""The source model's tokenizer, when it has a usable one.

Weights-only checkpoints (config.json and safetensors, no tokenizer files) are a common layout for
fine-tunes, and a tokenizer that is present may still fail to load (a missing sentencepiece model,
a tokenizer class this transformers version lacks). Neither is a reason to fail a job by itself:
callers get ``None`` plus a sentence saying why, and decide what the job does without one (the
verification gate switches to token ids; calibration either uses token ids or refuses, per scheme).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optjob.errors import first_line

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def remove_tokenizer_files(model_dir: Path) -> None:
    """Make ``model_dir`` weights-only (how many fine-tunes are published): tests and benchmarks."""
    for item in Path(model_dir).iterdir():
        if item.name in TOKENIZER_FILES or item.name.startswith(("tokenizer", "special_tokens")):
            item.unlink()


@dataclass(frozen=True)
class TokenizerLoad:
    tokenizer: Any | None
    warning: str | None

    @property
    def ok(self) -> bool:
        return self.tokenizer is not None


def load_tokenizer(model_dir: Path) -> TokenizerLoad:
    """``AutoTokenizer.from_pretrained(model_dir)``, or None and the reason it is unusable."""
    model_dir = Path(model_dir)
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        return TokenizerLoad(None, f"the model has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])})")
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as exc:  # noqa: BLE001 - any loader failure means "no usable tokenizer"
        return TokenizerLoad(
            None, f"the model's tokenizer could not be loaded ({type(exc).__name__}: {first_line(exc)})"
        )
    return TokenizerLoad(tokenizer, None)


def token_id_sequences(config: dict[str, Any], *, count: int, length: int, seed: int) -> list[list[int]]:
    """Fixed, seeded token-id sequences drawn from the model's vocabulary, special ids excluded.

    Used where text cannot be tokenized: the same seed gives the same ids on every host, so two
    runs of a job are compared on identical inputs.
    """
    import torch

    text_config = config.get("text_config") or config
    vocab = int(text_config["vocab_size"])
    special: set[int] = set()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = text_config.get(key, config.get(key))
        if isinstance(value, int):
            special.add(value)
        elif isinstance(value, list):
            special.update(v for v in value if isinstance(v, int))
    allowed = torch.tensor([i for i in range(vocab) if i not in special], dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    return [allowed[torch.randint(len(allowed), (length,), generator=generator)].tolist() for _ in range(count)]
