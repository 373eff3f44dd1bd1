"""A tiny, locally built Llama checkpoint for tests: no Hub, seconds to build, cached on disk.

Random-init models have near-uniform next-token distributions, so accuracy gates (top-1 agreement,
KL divergence) would pass anything. The builder therefore trains the model for a few dozen steps
on the shipped calibration corpus, which is enough to give it peaked, text-dependent predictions
that quantization error visibly perturbs, while staying under ~30 s on two cores.

The result is cached under ``$OPTJOB_CACHE_DIR/tiny-models/<key>`` (default ``~/.cache/optjob``)
keyed by every argument and the library versions, and copied into the caller's directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

_BUILDER_VERSION = 3
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")


def cache_base() -> Path:
    """``$OPTJOB_CACHE_DIR`` or ``~/.cache/optjob``: where locally built models and benchmarks cache."""
    base = os.environ.get("OPTJOB_CACHE_DIR")
    return Path(base) if base else Path.home() / ".cache" / "optjob"


def cache_root() -> Path:
    return cache_base() / "tiny-models"


def build_cached(entry: Path, marker: str, build: Callable[[Path], None]) -> bool:
    """Make the cache directory ``entry`` unless it holds ``marker``; True if it was built now.

    ``build`` fills a fresh temporary directory beside ``entry``, which is then renamed into place:
    the rename is atomic, so concurrent builders race and one wins, and a crash never leaves a
    half-built entry. A directory at ``entry`` without ``marker`` is a leftover and is replaced.
    """
    if (entry / marker).is_file():
        return False
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    try:
        build(tmp)
        if entry.exists() and not (entry / marker).is_file():
            shutil.rmtree(entry, ignore_errors=True)
        try:
            tmp.rename(entry)
        except OSError:
            if not (entry / marker).is_file():  # lost the race to another builder: theirs is as good
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def _training_texts() -> list[str]:
    from optjob.techniques.quantize.calibration import load_texts

    return load_texts(None)


def llama_config(tokenizer: Any, *, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> Any:
    """The Llama architecture of the locally built models (tests' tiny one, the benchmark reference),
    with the special tokens of ``tokenizer`` and untied embeddings as in Llama 3."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def save_generation_config(tokenizer: Any, out: Path) -> None:
    """Greedy decoding with the tokenizer's special tokens, as the locally built models ship it."""
    from transformers import GenerationConfig

    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=32,
    ).save_pretrained(out)


def build_tokenizer(out_dir: Path, *, vocab: int, texts: list[str]) -> Any:
    """Byte-level BPE trained on local text, wrapped as ``PreTrainedTokenizerFast`` and saved."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=2048,
    )
    fast.save_pretrained(out_dir)
    return fast


def _train(model: Any, tokenizer: Any, texts: list[str], *, steps: int, seq: int, seed: int) -> float:
    """A few AdamW steps of next-token prediction; returns the final loss (for the record)."""
    import torch

    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
    data = torch.tensor(ids, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    loss_value = float("nan")
    batch = 8
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        x = torch.stack([data[s : s + seq] for s in starts])
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = float(out.loss.detach())
    model.eval()
    return loss_value


def _build(
    out: Path,
    *,
    seed: int,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    vocab: int,
    shards: int,
    train_steps: int,
    dtype: str,
) -> None:
    import torch
    from transformers import LlamaForCausalLM

    texts = _training_texts()
    tokenizer = build_tokenizer(out, vocab=vocab, texts=texts)
    torch.manual_seed(seed)
    config = llama_config(
        tokenizer, hidden=hidden, intermediate=intermediate, layers=layers, heads=heads, kv_heads=kv_heads
    )
    model = LlamaForCausalLM(config)
    loss = _train(model, tokenizer, texts, steps=train_steps, seq=128, seed=seed) if train_steps else None
    model = model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    shard_size = f"{max(1, total // shards // 1000 + 1)}KB" if shards > 1 else "50GB"
    model.save_pretrained(out, max_shard_size=shard_size, safe_serialization=True)
    save_generation_config(tokenizer, out)
    (out / "optjob_tiny_model.json").write_text(
        json.dumps({"final_train_loss": loss, "train_steps": train_steps, "seed": seed}, indent=1)
    )


def build_tiny_llama(
    dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    hidden: int = 256,
    intermediate: int = 512,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 2048,
    shards: int = 1,
    train_steps: int = 150,
    dtype: str = "bfloat16",
    tokenizer: bool = True,
) -> Path:
    """Write a small ``LlamaForCausalLM`` HF directory to ``dir`` and return its path.

    The directory holds ``config.json``, safetensors weights (``shards > 1`` gives roughly that
    many shards plus ``model.safetensors.index.json``), a byte-level BPE ``tokenizer.json`` with
    its config, and ``generation_config.json``. Linear dimensions default to multiples of 128 so
    group-128 int4 and 128x128 FP8 blocks apply to every layer. Built once per argument set,
    then copied from the cache. ``tokenizer=False`` leaves the tokenizer files out (a weights-only
    checkpoint).
    """
    import tokenizers
    import torch
    import transformers

    args = dict(
        seed=seed,
        hidden=hidden,
        intermediate=intermediate,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        vocab=vocab,
        shards=shards,
        train_steps=train_steps,
        dtype=dtype,
    )
    stamp = [_BUILDER_VERSION, args, torch.__version__, transformers.__version__, tokenizers.__version__]
    key = hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:16]
    cached = cache_root() / key
    build_cached(cached, "config.json", lambda tmp: _build(tmp, **args))  # type: ignore[arg-type]
    dest = Path(dir)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(cached, dest, dirs_exist_ok=True)
    if not tokenizer:
        from optjob.model_tokenizer import remove_tokenizer_files

        remove_tokenizer_files(dest)
    return dest
