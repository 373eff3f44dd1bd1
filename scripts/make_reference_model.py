"""Train the reference model: a small Llama-architecture causal LM whose accuracy means something.

Why: quantization quality is "how much of the model's accuracy is kept", and a random-init model
has none to keep (its next-token distribution is near uniform, so any scheme scores perfectly on
top-1 agreement and KL). This script trains a ~16 M-parameter Llama (hidden 384, 6 layers, GQA
6/2 heads, SwiGLU 1024, untied 8192-token vocabulary) on the Python standard library's sources and
documentation (``pydoc_data`` topics, docstrings) from this interpreter, with a byte-level BPE
tokenizer trained on the same text by ``optjob.testing.tiny_model.build_tokenizer``. Linear widths
are multiples of 128 so every scheme (group-128 int4, 128x128 FP8 blocks) applies to every layer.

Deterministic for a seed: files are read in sorted order, every ``holdout_every``-th file is held
out (never trained on), training runs a fixed number of steps (not a time budget) on windows drawn
from a seeded generator, and torch's thread count is pinned (``--threads``), because float
reductions depend on it. The result is cached under ``$OPTJOB_CACHE_DIR/reference-models/<key>``
(default ``~/.cache/optjob``), keyed by every argument, the library versions and the corpus
fingerprint; a second run prints the cached report and trains nothing.

Held-out perplexity of the random-init and the trained model are printed (and stored in
``report.json``), both on the same windows of held-out files, with the saved bf16 checkpoint.

Run in full (default 400 steps of 16 x 256 tokens, 1.6 M tokens; 15.7 M parameters). On 2 idle
cores training runs at ~0.53 steps/s, about 13 minutes in all; on a shared host it is slower (the
first build here took 27 minutes at 0.25 steps/s under a load average of 4-6). Held-out perplexity
of that build: 9093 random-init, 84.1 trained. The figures do not depend on the load, only the time:

    .venv/bin/python scripts/make_reference_model.py

``--quick`` builds a toy version in seconds (for the smoke test). ``--out DIR`` also copies the model.
``--rebuild`` trains again although a cached build exists (to time it on a quiet machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common  # noqa: E402

_BUILDER_VERSION = 1
_EXCLUDED_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "turtledemo", "lib2to3"}


@dataclass(frozen=True)
class RefArgs:
    """Every input that changes the model; the cache key is a hash of these (plus versions)."""

    seed: int = 0
    hidden: int = 384
    intermediate: int = 1024
    layers: int = 6
    heads: int = 6
    kv_heads: int = 2
    vocab: int = 8192
    seq: int = 256
    batch: int = 16
    steps: int = 400
    lr: float = 2e-3
    warmup: int = 20
    weight_decay: float = 0.1
    holdout_every: int = 20
    eval_windows: int = 64
    threads: int = 2
    max_corpus_bytes: int = 0  # 0 = every selected file
    dtype: str = "bfloat16"


QUICK = RefArgs(
    hidden=128,
    intermediate=256,
    layers=2,
    heads=2,
    kv_heads=1,
    vocab=512,
    seq=64,
    batch=4,
    steps=8,
    warmup=2,
    holdout_every=5,
    eval_windows=4,
    max_corpus_bytes=120_000,
)


@dataclass(frozen=True)
class ReferenceModel:
    """The cached result: ``model_dir`` is a HF directory; ``heldout_path`` holds the eval token ids."""

    root: Path
    report: dict[str, Any]

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def heldout_path(self) -> Path:
        return self.root / "heldout.safetensors"

    def heldout_ids(self) -> Any:
        from safetensors.torch import load_file

        return load_file(str(self.heldout_path))["input_ids"]

    def eval_windows(self, count: int | None = None) -> Any:
        """The held-out windows this model's own report was measured on (or the first ``count``)."""
        args = self.report["args"]
        return bench_common.heldout_windows(self.heldout_ids(), seq=args["seq"], count=count or args["eval_windows"])


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(max_bytes: int = 0) -> list[Path]:
    """Standard-library sources in sorted order, without tests, IDLE, demos and installed packages."""
    root = stdlib_root()
    files = []
    size = 0
    for path in sorted(root.rglob("*.py")):
        if _EXCLUDED_DIRS & set(path.relative_to(root).parts) or not path.is_file():
            continue
        files.append(path)
        size += path.stat().st_size
        if max_bytes and size >= max_bytes:
            break
    return files


def split_corpus(files: list[Path], every: int) -> tuple[list[str], list[str], dict[str, Any]]:
    """(train texts, held-out texts, description): every ``every``-th file (from the first) is held out."""
    root = stdlib_root()
    train, held = [], []
    digest = hashlib.sha256()
    for index, path in enumerate(files):
        text = path.read_text(encoding="utf-8", errors="replace")
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + text.encode() + b"\0")
        (held if index % every == 0 else train).append(text)
    info = {
        "root": str(root),
        "files": len(files),
        "train_files": len(train),
        "heldout_files": len(held),
        "train_bytes": sum(len(t.encode()) for t in train),
        "heldout_bytes": sum(len(t.encode()) for t in held),
        "sha256": digest.hexdigest()[:16],
    }
    return train, held, info


def _encode(tokenizer: Any, texts: list[str]) -> Any:
    """One token stream: each document starts with BOS (the tokenizer adds it), then its tokens."""
    import torch

    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=True)["input_ids"]:
        ids.extend(enc)
    return torch.tensor(ids, dtype=torch.long)


def _lr_at(step: int, args: RefArgs) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _train(model: Any, data: Any, args: RefArgs, log_every: int) -> dict[str, Any]:
    import torch

    gen = torch.Generator().manual_seed(args.seed + 1)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    model.train()
    started = time.perf_counter()
    losses: list[float] = []
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, args)
        starts = torch.randint(0, len(data) - args.seq - 1, (args.batch,), generator=gen)
        x = torch.stack([data[s : s + args.seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if log_every and (step % log_every == 0 or step == args.steps - 1):
            rate = (step + 1) / (time.perf_counter() - started)
            print(f"  step {step + 1}/{args.steps}  loss {losses[-1]:.3f}  {rate:.2f} steps/s", flush=True)
    model.eval()
    seconds = time.perf_counter() - started
    return {
        "train_seconds": round(seconds, 1),
        "steps_per_second": round(args.steps / seconds, 4),
        "tokens_seen": args.steps * args.batch * args.seq,
        "final_loss_avg10": round(sum(losses[-10:]) / len(losses[-10:]), 4),
        "first_loss": round(losses[0], 4),
    }


def _build(out: Path, args: RefArgs, log_every: int) -> dict[str, Any]:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    from optjob.testing.tiny_model import build_tokenizer, llama_config, save_generation_config

    t0 = time.perf_counter()
    train_texts, held_texts, corpus = split_corpus(corpus_files(args.max_corpus_bytes), args.holdout_every)
    model_dir = out / "model"
    tokenizer = build_tokenizer(model_dir, vocab=args.vocab, texts=train_texts)
    tokenizer.model_max_length = sys.maxsize  # whole files are encoded once, then cut into windows
    train_ids = _encode(tokenizer, train_texts)
    held_ids = _encode(tokenizer, held_texts)
    corpus.update(train_tokens=int(train_ids.numel()), heldout_tokens=int(held_ids.numel()))
    save_file({"input_ids": held_ids}, str(out / "heldout.safetensors"))
    prep_s = time.perf_counter() - t0
    print(f"corpus: {json.dumps(corpus)} (tokenizer + encoding {prep_s:.1f} s)", flush=True)

    torch.manual_seed(args.seed)
    config = llama_config(
        tokenizer, hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
        heads=args.heads, kv_heads=args.kv_heads,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    windows = bench_common.heldout_windows(held_ids, seq=args.seq, count=args.eval_windows)
    random_ppl = bench_common.perplexity(model, windows)
    print(f"model: {params / 1e6:.2f} M parameters; random-init held-out perplexity {random_ppl:.1f}", flush=True)

    training = _train(model, train_ids, args, log_every)
    trained_fp32_ppl = bench_common.perplexity(model, windows)
    model = model.to(getattr(torch, args.dtype))
    model.config.dtype = args.dtype
    model.save_pretrained(model_dir, safe_serialization=True)
    save_generation_config(tokenizer, model_dir)
    saved = bench_common.load_causal_lm(model_dir, float32=True)
    trained_ppl = bench_common.perplexity(saved, windows)
    return {
        "args": dataclasses.asdict(args),
        "parameters": params,
        "corpus": corpus,
        "eval": {"windows": int(windows.shape[0]), "seq": args.seq, "tokens": int(windows.numel())},
        "random_init_perplexity": random_ppl,
        "trained_perplexity_fp32": trained_fp32_ppl,
        "trained_perplexity": trained_ppl,
        "uniform_perplexity": float(len(tokenizer)),
        "prep_seconds": round(prep_s, 1),
        **training,
        "total_seconds": round(time.perf_counter() - t0, 1),
    }


def cache_key(args: RefArgs) -> str:
    import tokenizers
    import torch
    import transformers

    files = corpus_files(args.max_corpus_bytes)
    root = stdlib_root()
    listing = [(p.relative_to(root).as_posix(), p.stat().st_size) for p in files]
    stamp = [
        _BUILDER_VERSION,
        dataclasses.asdict(args),
        torch.__version__,
        transformers.__version__,
        tokenizers.__version__,
        sys.version_info[:3],
        listing,
    ]
    return hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:16]


def build_reference_model(args: RefArgs = RefArgs(), *, log_every: int = 10, rebuild: bool = False) -> ReferenceModel:
    """Return the cached reference model for ``args``, training it first if absent (or ``rebuild``)."""
    import torch

    from optjob.testing.tiny_model import build_cached

    root = bench_common.cache_root() / "reference-models"
    key = cache_key(args)
    cached = root / key
    if rebuild:
        shutil.rmtree(cached, ignore_errors=True)

    def build(tmp: Path) -> None:
        with bench_common.torch_threads(args.threads):
            previous = torch.get_rng_state()
            try:
                report = _build(tmp, args, log_every)
            finally:
                torch.set_rng_state(previous)
        report["cache_key"] = key
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")

    built = build_cached(cached, "report.json", build)
    report = json.loads((cached / "report.json").read_text())
    return ReferenceModel(cached, {**report, "built_now": built})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="toy model in seconds (smoke tests)")
    parser.add_argument("--out", type=Path, help="also copy the model directory here")
    parser.add_argument("--log-every", type=int, default=10, help="print the loss every N steps")
    parser.add_argument("--rebuild", action="store_true", help="train again even if cached (to time it)")
    defaults = RefArgs()
    for f in dataclasses.fields(RefArgs):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)), default=None)
    ns = parser.parse_args(argv)
    bench_common.exit_on_sigterm()
    base = QUICK if ns.quick else defaults
    overrides = {f.name: getattr(ns, f.name) for f in dataclasses.fields(RefArgs) if getattr(ns, f.name) is not None}
    args = dataclasses.replace(base, **overrides)
    bench_common.banner("make_reference_model", {**dataclasses.asdict(args), "cache_key": cache_key(args)})
    started = time.perf_counter()
    ref = build_reference_model(args, log_every=ns.log_every, rebuild=ns.rebuild)
    elapsed = time.perf_counter() - started
    rep = ref.report
    print(f"reference model: {ref.model_dir} ({'built' if rep['built_now'] else 'cached'} in {elapsed:.1f} s)")
    bench_common.print_table(
        ["figure", "value"],
        [
            ["parameters (M)", rep["parameters"] / 1e6],
            ["train files / held-out files", f"{rep['corpus']['train_files']} / {rep['corpus']['heldout_files']}"],
            ["train tokens / held-out tokens", f"{rep['corpus']['train_tokens']} / {rep['corpus']['heldout_tokens']}"],
            ["eval windows x seq", f"{rep['eval']['windows']} x {rep['eval']['seq']}"],
            ["tokens seen in training", rep["tokens_seen"]],
            ["train seconds / steps per s", f"{rep['train_seconds']} / {rep['steps_per_second']}"],
            ["total build seconds", rep["total_seconds"]],
            ["uniform perplexity (= vocab)", rep["uniform_perplexity"]],
            ["random-init held-out perplexity", rep["random_init_perplexity"]],
            ["trained held-out perplexity (fp32)", rep["trained_perplexity_fp32"]],
            ["trained held-out perplexity (saved bf16)", rep["trained_perplexity"]],
        ],
        title="reference model",
    )
    if ns.out:
        shutil.copytree(ref.model_dir, ns.out, dirs_exist_ok=True)
        print(f"copied to {ns.out}")


if __name__ == "__main__":
    main()
