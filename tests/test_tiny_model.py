"""The tiny Llama builder other tests rely on: loads with transformers, shards, caches."""

from __future__ import annotations

import json
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from optjob.testing import build_tiny_llama


def test_builds_complete_hf_directory(tmp_path):
    model_dir = build_tiny_llama(tmp_path / "m")
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ):
        assert (model_dir / name).is_file(), name
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["hidden_size"] % 128 == 0 and cfg["intermediate_size"] % 128 == 0

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = "Return the number of items in the sequence."
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logp = model(**tok(text, return_tensors="pt")).logits.log_softmax(-1)
    # trained a little: predictions are far from uniform over the vocabulary
    assert float(logp.max(-1).values.exp().mean()) > 5.0 / len(tok)
    assert GenerationConfig.from_pretrained(model_dir).eos_token_id == tok.eos_token_id


def test_sharded_has_index_and_cache_is_fast(tmp_path):
    first = build_tiny_llama(tmp_path / "a", shards=3)
    index = json.loads((first / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    started = time.monotonic()
    second = build_tiny_llama(tmp_path / "b", shards=3)
    assert time.monotonic() - started < 5.0  # served from the cache
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    assert all((first / n).read_bytes() == (second / n).read_bytes() for n in names)


@pytest.mark.parametrize("seed", [1])
def test_seed_changes_weights(tmp_path, seed):
    a = build_tiny_llama(tmp_path / "a", train_steps=0)
    b = build_tiny_llama(tmp_path / "b", train_steps=0, seed=seed)
    assert (a / "model.safetensors").read_bytes() != (b / "model.safetensors").read_bytes()


def test_build_cached_builds_once_replaces_leftovers_and_leaves_nothing_on_failure(tmp_path) -> None:
    from optjob.testing.tiny_model import build_cached

    entry = tmp_path / "cache" / "entry"
    calls = []

    def build(tmp):
        calls.append(tmp)
        (tmp / "data").write_text("payload")
        (tmp / "done.json").write_text("{}")

    entry.mkdir(parents=True)
    (entry / "stale").write_text("from an old, unfinished layout")  # no marker: a leftover
    assert build_cached(entry, "done.json", build) is True
    assert sorted(p.name for p in entry.iterdir()) == ["data", "done.json"]
    assert build_cached(entry, "done.json", build) is False
    assert len(calls) == 1
    assert sorted(p.name for p in entry.parent.iterdir()) == ["entry"]  # no temporary left beside it

    def failing(tmp):
        (tmp / "half").write_text("x")
        raise RuntimeError("build failed")

    other = tmp_path / "cache" / "other"
    with pytest.raises(RuntimeError, match="build failed"):
        build_cached(other, "done.json", failing)
    assert sorted(p.name for p in other.parent.iterdir()) == ["entry"]
