"""Time and memory of a whole FP8 job on a large checkpoint, against its floor and the usual baseline.

Why: "time taken, memory needed" only mean something beside what the same machine does without us,
measured in the same run (this host is shared; absolute seconds drift, ratios much less). Setup: a
synthetic checkpoint with the real Llama-3.2-1B architecture (hidden 2048, 16 layers, 32/8 heads,
SwiGLU 8192, vocab 128256, tied embeddings: 1.24 B parameters, ~2.5 GB bf16), random weights
written shard by shard (never the whole model in memory) with an index, config and a tokenizer,
cached under ``$OPTJOB_CACHE_DIR/bench/`` (default ``~/.cache/optjob``). It is uploaded to a real
local S3 server (SeaweedFS ``weed mini``, started with tests/support/s3server.py's helpers). Then, one after
another in one run, each as its own measured process tree (wall time; peak RSS summed over the tree,
sampled every 50 ms):

(a)  floor: ``aws s3 cp --recursive`` S3 -> S3 (what a user runs to copy a model; the server copies),
(a') floor through this host: ``aws s3 cp`` down to disk, then ``aws s3 cp`` up (no processing),
(b)  sequential baseline: ``aws s3 cp`` down, llm-compressor ``oneshot`` FP8_DYNAMIC on the model
     loaded whole in memory, ``save_pretrained(save_compressed=True)``, ``aws s3 cp`` up,
(c)  optjob: ``optjob run SPEC.json`` (create + run in the foreground: fetch, streaming FP8_DYNAMIC,
     verification gate, publish), with a fresh ``OPTJOB_HOME`` and the standard AWS environment.

Printed: wall and peak RSS of each, c/a, c/a', c/b, and optjob's peak RSS as a share of the model;
also the anonymous part of the RSS (RSS minus mapped files: checkpoints read through mmap count in
RSS but are reclaimable page cache) and each run's largest processes by their own peak, so a miss
says which process holds the memory.
Then S3 throughput on the same 2.5 GB: our transfer code (``optjob.storage``: ``run_transfers`` raw,
and ``fetch_model`` / ``publish_model`` with their integrity hashing) against ``aws s3 cp``.

Targets (issue #7): c/a <= 1.3, optjob peak RSS <= 25 % of the model's size; (issue #15) c/a' <= 1.2,
c/b <= 0.7, the worker's peak RSS minus its idle RSS after imports <= 256 MiB whatever the model; (issue
#18) the verification gate's end-to-end check, which replays both checkpoints a decoder layer at
a time inside the worker, adds <= 25 % of the model's size to the worker's RSS (its figures come
from the job's manifest). ``--arch llama-0.98gb`` is the outside report's weights-only checkpoint (no tokenizer).

Full run (about 4 minutes on 2 cores under a load average of ~4.5; the first run also writes the
2.5 GB checkpoint, ~15 s, and needs ~20 GB free disk under /tmp for the S3 server's data):

    .venv/bin/python scripts/bench_pipeline.py

Optional runs in the same measurement: ``--file-granularity`` (the job on the shard-at-a-time path),
``--memory-limit-mib N`` (``optjob-worker`` inside a kernel memory cgroup of N MiB, 0 = a third of the
model, then once more below what is in use + the streaming budget, which must fail with a clear
reason; needs root), ``--pin`` ((a') and (c) on CPU 1 with the S3 server pinned to CPU 0).

``--quick`` does the same on a ~30 M-parameter checkpoint (about 25 s, for checking the script).
Results also go to ``$OPTJOB_CACHE_DIR/bench/results/`` as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common  # noqa: E402

_SYNTH_VERSION = 2
MiB = 2**20


@dataclass(frozen=True)
class SynthArch:
    """A Llama architecture to fill with random weights (defaults: Llama-3.2-1B's config.json)."""

    name: str = "llama-3.2-1b"
    hidden: int = 2048
    layers: int = 16
    heads: int = 32
    kv_heads: int = 8
    intermediate: int = 8192
    vocab: int = 128256
    tied: bool = True
    max_shard_bytes: int = 512 * MiB
    seed: int = 0
    tokenizer: bool = True  # False: a weights-only checkpoint (config.json and safetensors)


QUICK_ARCH = SynthArch(
    name="llama-quick",
    hidden=512,
    layers=4,
    heads=8,
    kv_heads=2,
    intermediate=1536,
    vocab=32000,
    max_shard_bytes=16 * MiB,
)

# Llama-3.2-3B's config.json, sharded the way its published checkpoint is (two files of up to 5 GB):
# the case where a shard no longer fits a "few shards in memory" design.
ARCHES = {
    "llama-3.2-1b": SynthArch(),
    "llama-3.2-3b": SynthArch(
        name="llama-3.2-3b", hidden=3072, layers=28, heads=24, kv_heads=8, intermediate=8192,
        max_shard_bytes=5_000_000_000,
    ),
    # The outside report's checkpoint (issue #18): Llama shape, 0.98 GB in three shards, no tokenizer.
    "llama-0.98gb": SynthArch(
        name="llama-0.98gb", hidden=1024, layers=23, heads=16, kv_heads=8, intermediate=4096,
        max_shard_bytes=350 * MiB, tokenizer=False,
    ),
    "quick": QUICK_ARCH,
}  # fmt: skip


def _tensor_shapes(a: SynthArch) -> list[tuple[str, tuple[int, ...]]]:
    """Every parameter of ``LlamaForCausalLM`` in HF order (lm_head omitted when tied)."""
    head_dim = a.hidden // a.heads
    kv = a.kv_heads * head_dim
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (a.vocab, a.hidden))]
    for i in range(a.layers):
        p = f"model.layers.{i}"
        shapes += [
            (f"{p}.input_layernorm.weight", (a.hidden,)),
            (f"{p}.self_attn.q_proj.weight", (a.hidden, a.hidden)),
            (f"{p}.self_attn.k_proj.weight", (kv, a.hidden)),
            (f"{p}.self_attn.v_proj.weight", (kv, a.hidden)),
            (f"{p}.self_attn.o_proj.weight", (a.hidden, a.hidden)),
            (f"{p}.post_attention_layernorm.weight", (a.hidden,)),
            (f"{p}.mlp.gate_proj.weight", (a.intermediate, a.hidden)),
            (f"{p}.mlp.up_proj.weight", (a.intermediate, a.hidden)),
            (f"{p}.mlp.down_proj.weight", (a.hidden, a.intermediate)),
        ]
    shapes.append(("model.norm.weight", (a.hidden,)))
    if not a.tied:
        shapes.append(("lm_head.weight", (a.vocab, a.hidden)))
    return shapes


def _config(a: SynthArch, tokenizer: Any) -> dict[str, Any]:
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        head_dim=a.hidden // a.heads,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=a.tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["LlamaForCausalLM"],
    )
    out = cfg.to_dict()
    out["dtype"] = "bfloat16"
    return out


def _init_std(name: str, a: SynthArch) -> float:
    """Standard deviation of a random weight; see ``write_synthetic_checkpoint`` for why these."""
    if name.endswith("embed_tokens.weight"):
        return 1.0
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return 0.02 / (2 * a.layers) ** 0.5
    return 0.02


def write_synthetic_checkpoint(out: Path, a: SynthArch) -> dict[str, Any]:
    """Random bf16 weights, one shard in memory at a time, plus the index, config and a tokenizer.

    With every weight at std 0.02 (HF's Llama init) a random model's next-token distribution is
    nearly flat, so FP8 rounding flips its argmax at ~20 % of positions and optjob's verification
    gate rightly refuses to publish it: the job path could not be timed. The weights are therefore
    random with GPT-2-style scales that keep the residual stream dominated by the input token
    (embeddings std 1, residual-output projections o_proj/down_proj std 0.02/sqrt(2 x layers),
    other projections 0.02, norms 1): predictions are peaked and survive quantization. Time and
    memory, all that this benchmark measures, do not depend on the values.
    """
    import torch
    from safetensors.torch import save_file

    from optjob.techniques.quantize.calibration import load_texts
    from optjob.testing.tiny_model import build_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out, vocab=2048, texts=load_texts(None)[:400])
    (out / "config.json").write_text(json.dumps(_config(a, tokenizer), indent=2) + "\n")
    if not a.tokenizer:
        from optjob.model_tokenizer import remove_tokenizer_files

        remove_tokenizer_files(out)
    (out / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "do_sample": False,
                "max_new_tokens": 32,
            }
        )
        + "\n"
    )
    shapes = _tensor_shapes(a)
    limit = a.max_shard_bytes
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = 2 * int(torch.Size(shape).numel())
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    gen = torch.Generator().manual_seed(a.seed)
    weight_map: dict[str, str] = {}
    total = 0
    for index, group in enumerate(groups):
        fname = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            tensors[name] = (torch.randn(shape, generator=gen) * _init_std(name, a)).to(torch.bfloat16)
            if len(shape) == 1:
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            total += tensors[name].numel() * 2
            weight_map[name] = fname
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
    index_doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2) + "\n")
    params = sum(int(torch.Size(s).numel()) for _, s in shapes)
    return {"arch": asdict(a), "parameters": params, "weight_bytes": total, "shards": len(groups)}


def synthetic_checkpoint(a: SynthArch) -> tuple[Path, dict[str, Any]]:
    """The cached checkpoint for ``a`` (written on first use)."""
    import torch

    from optjob.testing.tiny_model import build_cached

    key = hashlib.sha256(json.dumps([_SYNTH_VERSION, asdict(a), torch.__version__]).encode()).hexdigest()[:12]
    root = bench_common.cache_root() / "bench"
    path = root / f"synthetic-{a.name}-{key}"
    info_file = path / "synthetic.json"

    def write(tmp: Path) -> None:
        started = time.perf_counter()
        info = write_synthetic_checkpoint(tmp / "model", a)
        info["write_seconds"] = round(time.perf_counter() - started, 1)
        (tmp / "synthetic.json").write_text(json.dumps(info, indent=2) + "\n")

    written = build_cached(path, info_file.name, write)
    return path / "model", {**json.loads(info_file.read_text()), "written_now": written}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --- S3 helpers ------------------------------------------------------------------------------------


@contextlib.contextmanager
def s3_server() -> Iterator[Any]:
    """tests/support/s3server.py's ``weed mini`` on loopback (importable because the repo root is on sys.path)."""
    from tests.support.s3server import run_weed_mini

    with run_weed_mini() as server:
        yield server


def delete_prefix(client: Any, bucket: str, prefix: str) -> None:
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})


def prefix_bytes(client: Any, bucket: str, prefix: str) -> tuple[int, int]:
    paginator = client.get_paginator("list_objects_v2")
    objs = [o for page in paginator.paginate(Bucket=bucket, Prefix=prefix) for o in page.get("Contents", [])]
    return len(objs), sum(o["Size"] for o in objs)


def aws_cli() -> list[str]:
    beside = Path(sys.executable).parent / "aws"
    return [str(beside)] if beside.is_file() else ["aws"]


def upload_tasks(local: Path, bucket: str, prefix: str) -> list[Any]:
    from optjob.storage.transfer import TransferTask

    files = sorted(p for p in local.rglob("*") if p.is_file())
    return [TransferTask(bucket, f"{prefix}{p.relative_to(local).as_posix()}", p, p.stat().st_size) for p in files]


def download_tasks(client: Any, bucket: str, prefix: str, dest: Path) -> list[Any]:
    from optjob.storage.transfer import TransferTask

    paginator = client.get_paginator("list_objects_v2")
    tasks = []
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            path = dest / o["Key"][len(prefix) :]
            path.parent.mkdir(parents=True, exist_ok=True)
            tasks.append(TransferTask(bucket, o["Key"], path, o["Size"], etag=o["ETag"]))
    return tasks


def our_transfer(direction: str, tasks: list[Any]) -> int:
    from optjob.runtime.cancel import CancelToken
    from optjob.runtime.events import NULL_SINK
    from optjob.storage.s3 import S3Settings, make_client
    from optjob.storage.transfer import run_transfers

    settings = S3Settings()
    return run_transfers(
        make_client(settings),
        settings,
        tasks,
        direction=direction,  # type: ignore[arg-type]
        events=NULL_SINK,
        cancel=CancelToken(),
        stage="bench",
    )


@contextlib.contextmanager
def patched_env(env: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def stage_source(server: Any, name: str, model_dir: Path) -> tuple[dict[str, str], Any, str, str]:
    """A source and an output bucket for ``name``, the model uploaded: (env for the AWS CLI and optjob,
    client, source URI, output bucket)."""
    env = {**os.environ, **server.aws_env()}
    for variable in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        env.pop(variable, None)
    client = server.client()
    src_bucket, out_bucket = f"src-{name.replace('.', '-')}", f"out-{name.replace('.', '-')}"
    for bucket in (src_bucket, out_bucket):
        client.create_bucket(Bucket=bucket)
    with patched_env(server.aws_env()):
        our_transfer("upload", upload_tasks(model_dir, src_bucket, "model/"))
    return env, client, f"s3://{src_bucket}/model/", out_bucket


def floor_copy(label: str, src_uri: str, out_uri: str, *, env: dict[str, str], work: Path) -> Any:
    """(a') the floor: ``aws s3 cp --recursive`` down to disk, then the same bytes up (copy removed)."""
    aws = " ".join(aws_cli())
    local = work / f"{label}-floor"
    m = bench_common.measured_step(label, "a2_download_then_upload", [
        "bash", "-c", f'{aws} s3 cp --recursive --only-show-errors "$1" "$2" && '
        f'{aws} s3 cp --recursive --only-show-errors "$2" "$3"', "floor", src_uri, str(local), out_uri,
    ], env=env, work=work)  # fmt: skip
    shutil.rmtree(local, ignore_errors=True)
    return m


# --- (b): the sequential baseline, run as its own process -------------------------------------------


def baseline_worker(src_uri: str, dst_uri: str, tmp: Path) -> dict[str, Any]:
    """Download all (aws s3 cp), oneshot FP8_DYNAMIC in memory, save compressed, upload all (aws s3 cp)."""
    import subprocess

    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    phases: dict[str, float] = {}
    local, out = tmp / "model", tmp / "out"
    t0 = time.perf_counter()
    subprocess.run([*aws_cli(), "s3", "cp", "--recursive", "--only-show-errors", src_uri, str(local)], check=True)
    phases["download_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(local, dtype=torch.bfloat16)
    has_tokenizer = any((local / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(local) if has_tokenizer else None  # weights-only: none to copy
    phases["load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    oneshot(model=model, recipe=[QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"])])
    phases["oneshot_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.save_pretrained(out, save_compressed=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    del model
    phases["save_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run([*aws_cli(), "s3", "cp", "--recursive", "--only-show-errors", str(out), dst_uri], check=True)
    phases["upload_s"] = time.perf_counter() - t0
    return {k: round(v, 2) for k, v in phases.items()} | {"output_bytes": dir_bytes(out)}


# --- the benchmark ---------------------------------------------------------------------------------


FP8_DYNAMIC_CONFIG = {
    "ModelQuantizationConfig": {"OverrideEnvironment": {"OPTION_QUANTIZE": "fp8", "OPTION_FP8_SCHEME": "FP8_DYNAMIC"}}
}


def job_spec(
    name: str, src_uri: str, out_uri: str, target: str, config: dict[str, Any] = FP8_DYNAMIC_CONFIG
) -> dict[str, Any]:
    """The benchmark's CreateOptimizationJob request; ``config`` is its one OptimizationConfig."""
    return {
        "OptimizationJobName": name,
        "RoleArn": "arn:aws:iam::111122223333:role/service-role/Bench",
        "ModelSource": {"S3": {"S3Uri": src_uri}},
        "DeploymentInstanceType": target,
        "OptimizationConfigs": [config],
        "OutputConfig": {"S3OutputLocation": out_uri},
        "StoppingCondition": {"MaxRuntimeInSeconds": 36000},
    }


def run(opts: argparse.Namespace) -> dict[str, Any]:
    arch = QUICK_ARCH if opts.quick else ARCHES[opts.arch]
    t0 = time.perf_counter()
    model_dir, synth = synthetic_checkpoint(arch)
    prep_s = time.perf_counter() - t0
    size = dir_bytes(model_dir)
    if opts.work_dir is not None:
        opts.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-", dir=opts.work_dir))
    record = bench_common.banner(
        "bench_pipeline",
        {
            "model": f"synthetic {arch.name}: {synth['parameters'] / 1e9:.3f} B params, bf16, "
            f"{synth['shards']} shards, {synth['weight_bytes'] / 1e9:.3f} GB weights, {size / 1e9:.3f} GB directory",
            "model_dir": str(model_dir),
            "arch": asdict(arch),
            "scheme": "FP8_DYNAMIC (data-free), lm_head kept",
            "optjob_target": opts.target,
            "s3": "SeaweedFS weed mini on loopback (tests/support/s3server.py)",
            "aws_cli": " ".join(aws_cli()),
            "our_transfer_settings": "optjob.storage.S3Settings() defaults: 10 threads, 16 MiB parts",
            "work_dir": str(work),
        },
    )
    print(f"checkpoint ready in {prep_s:.1f} s ({'written' if synth['written_now'] else 'cached'})", flush=True)
    results: dict[str, Any] = {}
    try:
        with s3_server() as server:
            results = _measure(server, model_dir, size, work, opts)
    finally:
        if not opts.keep:
            shutil.rmtree(work, ignore_errors=True)
    record.update(model_bytes=size, synthetic=synth, results=results)
    return record


def _measure(server: Any, model_dir: Path, size: int, work: Path, opts: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, **server.aws_env()}
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        env.pop(name, None)
    client = server.client()
    src_bucket, out_bucket = "bench-src", "bench-out"
    client.create_bucket(Bucket=src_bucket)
    client.create_bucket(Bucket=out_bucket)
    src_uri = f"s3://{src_bucket}/model/"
    gb = size / 1e9
    res: dict[str, Any] = {}
    aws = aws_cli()

    def note(msg: str) -> None:
        print(f"--- {msg} ({bench_common.load_note()})", flush=True)

    with patched_env(server.aws_env()):
        note("setup: uploading the source with our transfer code (also the 'ours upload' throughput figure)")
        t0 = time.perf_counter()
        our_transfer("upload", upload_tasks(model_dir, src_bucket, "model/"))
        res["throughput_our_upload_raw_s"] = time.perf_counter() - t0

    def measured(name: str, cmd: list[str], extra_env: dict[str, str] | None = None,
                 preexec: Any = None) -> bench_common.Measured:  # fmt: skip
        note(name)
        m = bench_common.run_measured(name, cmd, env={**env, **(extra_env or {})}, log_path=work / f"{name}.log",
                                      preexec=preexec)  # fmt: skip
        print(
            f"    wall {m.wall_s:.1f} s, peak RSS (tree) {m.peak_tree_bytes / MiB:.0f} MiB "
            f"(anonymous {m.peak_tree_anon_bytes / MiB:.0f} MiB), rc {m.rc}",
            flush=True,
        )
        for proc_name, rss, anon in m.top_processes[:3]:
            print(f"      own peak RSS {rss / MiB:7.0f} MiB, anonymous {anon / MiB:7.0f} MiB: {proc_name}", flush=True)
        if m.rc != 0:
            print(f"    FAILED; log tail:\n{m.output_tail[-2000:]}", flush=True)
        return m

    # (a) the literal S3->S3 copy, (a') the same bytes through this host
    a = measured(
        "a_s3_to_s3_copy", [*aws, "s3", "cp", "--recursive", "--only-show-errors", src_uri, f"s3://{out_bucket}/copy/"]
    )
    delete_prefix(client, out_bucket, "copy/")
    local = work / "a2"
    a2_cmd = [
        "bash",
        "-c",
        f'{" ".join(aws)} s3 cp --recursive --only-show-errors "$1" "$2" && '
        f'{" ".join(aws)} s3 cp --recursive --only-show-errors "$2" "$3"',
        "a2",
        src_uri,
        str(local),
        f"s3://{out_bucket}/copy2/",
    ]
    a2 = measured("a2_download_then_upload", a2_cmd)
    shutil.rmtree(local, ignore_errors=True)
    delete_prefix(client, out_bucket, "copy2/")

    # (b) sequential baseline in its own process tree
    b_out = f"s3://{out_bucket}/baseline/"
    b_json = work / "b.json"
    b = measured(
        "b_sequential_llmcompressor",
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--baseline-worker",
            "--src-uri",
            src_uri,
            "--dst-uri",
            b_out,
            "--tmp",
            str(work / "b"),
            "--result",
            str(b_json),
        ],
        {"PYTHONPATH": str(bench_common.REPO_ROOT)},
    )
    b_phases = json.loads(b_json.read_text()) if b_json.is_file() else {}
    shutil.rmtree(work / "b", ignore_errors=True)
    b_objects = prefix_bytes(client, out_bucket, "baseline/")
    delete_prefix(client, out_bucket, "baseline/")

    # (c) optjob through the real job path
    spec = work / "spec.json"
    c_out = f"s3://{out_bucket}/optjob/"
    spec.write_text(json.dumps(job_spec("bench-fp8", src_uri, c_out, opts.target), indent=2))
    home = work / "optjob-home"
    c_cmd = [sys.executable, "-m", "optjob", "run", str(spec)]
    c = measured("c_optjob_run", c_cmd, {"OPTJOB_HOME": str(home), "PYTHONPATH": str(bench_common.REPO_ROOT)})
    c_objects = prefix_bytes(client, out_bucket, "optjob/")
    manifest = None
    with contextlib.suppress(Exception):
        body = client.get_object(Bucket=out_bucket, Key="optjob/optjob-manifest.json")["Body"].read()
        manifest = json.loads(body)
    delete_prefix(client, out_bucket, "optjob/")
    shutil.rmtree(home, ignore_errors=True)

    extra_runs = _extra_runs(opts, server, client, out_bucket, src_uri, a2_cmd, c_cmd, manifest, size, work, measured,
                             {"OPTJOB_HOME": str(home), "PYTHONPATH": str(bench_common.REPO_ROOT)})  # fmt: skip
    res["extra_runs"] = {label: m.as_dict() | extra for label, (m, extra) in extra_runs.items()}

    # (d) throughput of our transfer code vs aws s3 cp on the same objects
    if not opts.skip_throughput:
        with patched_env(server.aws_env()):
            res.update(_throughput(client, model_dir, src_bucket, out_bucket, work, measured))

    runs = [
        ("(a) aws s3 cp S3->S3", a),
        ("(a') aws s3 cp down + up", a2),
        ("(b) download, oneshot FP8_DYNAMIC, save, upload", b),
        ("(c) optjob run (FP8_DYNAMIC job)", c),
        *[(label, m) for label, (m, _) in extra_runs.items()],
    ]
    print()
    bench_common.print_table(
        ["run", "wall s", "peak RSS MiB (tree)", "anonymous MiB", "rc"],
        [[label, m.wall_s, m.peak_tree_bytes / MiB, m.peak_tree_anon_bytes / MiB, m.rc] for label, m in runs],
        title=f"pipeline on {gb:.2f} GB ({bench_common.load_note()}); anonymous = RSS minus mapped files",
    )
    ok = c.rc == 0
    ratios = {
        "c/a": c.wall_s / a.wall_s if ok else None,
        "c/a'": c.wall_s / a2.wall_s if ok else None,
        "c/b": c.wall_s / b.wall_s if ok and b.rc == 0 else None,
        "optjob peak RSS / model size": c.peak_tree_bytes / size if ok else None,
        "optjob peak anonymous RSS / model size": c.peak_tree_anon_bytes / size if ok else None,
        "baseline peak RSS / model size": b.peak_tree_bytes / size if b.rc == 0 else None,
    }
    stage_figures = next(iter(((manifest or {}).get("metrics") or {}).values()), {}) or {}
    idle = ((stage_figures.get("streaming") or {}).get("memory") or {}).get("rss_before_mib")
    if ok and idle is not None and stage_figures.get("peak_rss_mib") is not None:
        ratios["worker peak RSS - its idle RSS after imports (MiB)"] = stage_figures["peak_rss_mib"] - idle
        details = stage_figures.get("engine_details") or {}
        if details.get("stream_peak_rss_above_start_mib") is not None:
            ratios["stream alone: peak RSS above its start (MiB)"] = details["stream_peak_rss_above_start_mib"]
    gate = _gate_figures(manifest)
    if gate.get("peak_rss_above_start_mib") is not None:
        ratios["gate e2e peak RSS above its start / model size"] = gate["peak_rss_above_start_mib"] * MiB / size
    targets = {
        "c/a": 1.3,
        "c/a'": 1.2,
        "c/b": 0.7,
        "worker peak RSS - its idle RSS after imports (MiB)": 256,
        "stream alone: peak RSS above its start (MiB)": 256,
        "optjob peak RSS / model size": 0.25,
        "gate e2e peak RSS above its start / model size": 0.25,
    }
    bench_common.print_table(
        ["ratio", "value", "target", "met?"],
        [
            [
                k,
                v,
                f"<= {targets[k]}" if k in targets else "-",
                "-" if k not in targets or v is None else ("yes" if v <= targets[k] else "NO"),
            ]
            for k, v in ratios.items()
        ],
    )
    print(f"baseline phases: {b_phases}")
    print(
        f"outputs: baseline {b_objects[0]} objects / {b_objects[1] / 1e9:.3f} GB; "
        f"optjob {c_objects[0]} objects / {c_objects[1] / 1e9:.3f} GB"
    )
    if manifest is not None:
        print(f"optjob manifest timings: {manifest.get('timings')}")
        metrics = manifest.get("metrics") or {}
        print(f"optjob manifest metrics (abridged): {json.dumps(metrics, default=str)[:1500]}")
    if gate:
        print(f"verification gate: {json.dumps(gate)}")
    stage = next(iter(((manifest or {}).get("metrics") or {}).values()), {}) or {}
    if stage.get("streaming"):
        timings = stage.get("timings") or {}
        print(f"where (c)'s time went (manifest): stream {timings.get('quantize_s')} s, "
              f"gate {timings.get('verify_s')} s; "
              f"stream phases (s, summed over threads): {stage['streaming']['phases_s']}; "
              f"memory: {stage['streaming']['memory']}, worker peak {stage.get('peak_rss_mib')} MiB")  # fmt: skip
    for label, (m, extra) in extra_runs.items():
        print(f"{label}: wall {m.wall_s:.1f} s, rc {m.rc}, {json.dumps(extra)}")
    if c.rc != 0:
        print("(c) did not complete: see the log tail above; c/* ratios are not available.")
    res.update(
        a=a.as_dict(),
        a2=a2.as_dict(),
        b=b.as_dict() | {"phases": b_phases},
        c=c.as_dict(),
        ratios=ratios,
        targets=targets,
        outputs={"baseline": b_objects, "optjob": c_objects},
        optjob_manifest=manifest,
    )
    return res


def _weed_pid(server: Any) -> int | None:
    """The S3 server's PID, from the process listening on its port (so only it is pinned)."""
    import psutil

    port = int(str(server.endpoint_url).rsplit(":", 1)[1].strip("/"))
    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
            return conn.pid
    return None


def _extra_runs(opts: argparse.Namespace, server: Any, client: Any, out_bucket: str, src_uri: str, a2_cmd: list[str],
                c_cmd: list[str], manifest: dict[str, Any] | None, size: int, work: Path, measured: Any,
                c_env: dict[str, str]) -> dict[str, tuple[Any, dict[str, Any]]]:  # fmt: skip
    """Optional runs: the file-granular path, the job under a memory cgroup, and S3 server vs job on separate cores."""
    from optjob.testing.memory_cgroup import MemoryCgroup

    out: dict[str, tuple[Any, dict[str, Any]]] = {}
    spec = Path(c_cmd[-1])
    homes = iter(range(100))

    def fresh(env: dict[str, str]) -> dict[str, str]:  # each run its own job store: the job name repeats
        return {**env, "OPTJOB_HOME": str(work / f"home-{next(homes)}")}

    if opts.file_granularity:
        m = measured("c_file_granularity", c_cmd, fresh({**c_env, "OPTJOB_STREAM_GRANULARITY": "file"}))
        delete_prefix(client, out_bucket, "optjob/")
        out["(c-file) optjob run, shard-at-a-time path"] = (m, {})
    if opts.memory_limit_mib is not None:
        limit = int(size / 3 / MiB) if opts.memory_limit_mib == 0 else opts.memory_limit_mib
        stage = next(iter(((manifest or {}).get("metrics") or {}).values()), {}) or {}
        libraries = ((stage.get("streaming") or {}).get("memory") or {}).get("rss_before_mib") or 500
        budget = ((stage.get("streaming") or {}).get("memory") or {}).get("budget_mib") or 256
        worker = [sys.executable, "-m", "workers", "--spec", str(spec), "--work-dir", str(work / "limited")]
        for label, mib in ((f"(c-limit) optjob-worker, cgroup limit {limit} MiB", limit),
                           (f"(c-low) optjob-worker, limit {int(libraries + budget // 3)} MiB (< libraries + budget)",
                            int(libraries + budget // 3))):  # fmt: skip
            with MemoryCgroup(mib * MiB) as group:
                m = measured(label.split()[0].strip("()"), worker, fresh(c_env), preexec=group.preexec)
                peak = round((group.peak_bytes() or 0) / MiB)
                extra = {"limit_mib": mib, "model_over_limit": round(size / (mib * MiB), 2),
                         "oom_kills": group.oom_kills(), "cgroup_peak_mib": peak}  # fmt: skip
            if m.rc != 0:
                extra["reason"] = next(
                    (line for line in m.output_tail.splitlines() if "out of memory" in line.lower()), ""
                )[:400]
            delete_prefix(client, out_bucket, "optjob/")
            out[label] = (m, extra)
    if opts.pin:
        pid = _weed_pid(server)
        if pid is None:
            print("--pin: could not find the S3 server's PID; skipped", flush=True)
            return out
        before = os.sched_getaffinity(pid)
        os.sched_setaffinity(pid, {0})
        try:
            m = measured("a2_pinned", ["taskset", "-c", "1", *a2_cmd])
            delete_prefix(client, out_bucket, "copy2/")
            shutil.rmtree(Path(a2_cmd[-2]), ignore_errors=True)
            out["(a'-pinned) aws s3 cp down + up on CPU 1, S3 server on CPU 0"] = (m, {})
            m = measured("c_pinned", ["taskset", "-c", "1", *c_cmd], fresh(c_env))
            delete_prefix(client, out_bucket, "optjob/")
            out["(c-pinned) optjob run on CPU 1, S3 server on CPU 0"] = (m, {})
        finally:
            os.sched_setaffinity(pid, before)
    return out


def _gate_figures(manifest: dict[str, Any] | None) -> dict[str, Any]:
    """The verification gate's own cost and verdict from the job's manifest (the end-to-end check
    reports the worker's RSS when it began and how far above that it peaked)."""
    metrics = next(iter(((manifest or {}).get("metrics") or {}).values()), {}) or {}
    verification = metrics.get("verification") or {}
    e2e = verification.get("e2e") or {}
    keys = ("rss_at_start_mib", "peak_rss_above_start_mib", "seconds", "inputs", "max_layer_rel_error", "mean_kl",
            "top1_agreement", "confident_top1_agreement", "confident_positions", "positions")  # fmt: skip
    out = {k: e2e.get(k) for k in keys if k in e2e}
    if verification:
        out.update(passed=verification.get("passed"), verify_s=(metrics.get("timings") or {}).get("verify_s"))
    return out


def _throughput(client: Any, model_dir: Path, src_bucket: str, out_bucket: str, work: Path, measured: Any) -> dict:
    from optjob.storage.publish import publish_model
    from optjob.storage.source import fetch_model

    size = dir_bytes(model_dir)
    src_uri = f"s3://{src_bucket}/model/"
    aws = aws_cli()
    out: dict[str, float] = {}

    def timed(name: str, fn: Any) -> None:
        print(f"--- throughput: {name} ({bench_common.load_note()})", flush=True)
        t0 = time.perf_counter()
        fn()
        out[name] = time.perf_counter() - t0
        print(f"    {out[name]:.1f} s, {size / out[name] / MiB:.0f} MiB/s", flush=True)

    d1, d2, d3 = work / "dl-raw", work / "dl-fetch", work / "dl-aws"
    timed(
        "download ours (run_transfers)",
        lambda: our_transfer("download", download_tasks(client, src_bucket, "model/", d1)),
    )
    shutil.rmtree(d1, ignore_errors=True)
    timed("download ours (fetch_model, verified)", lambda: fetch_model(src_uri, d2))
    shutil.rmtree(d2, ignore_errors=True)
    m = measured("download aws s3 cp", [*aws, "s3", "cp", "--recursive", "--only-show-errors", src_uri, str(d3)])
    out["download aws s3 cp"] = m.wall_s
    shutil.rmtree(d3, ignore_errors=True)

    timed("upload ours (run_transfers)", lambda: our_transfer("upload", upload_tasks(model_dir, out_bucket, "up1/")))
    delete_prefix(client, out_bucket, "up1/")
    manifest = {"job_name": "bench", "job_arn": "arn:aws:sagemaker:us-east-1:111122223333:optimization-job/bench"}
    timed(
        "upload ours (publish_model, hashed + manifest)",
        lambda: publish_model(model_dir, f"s3://{out_bucket}/up2/", manifest=manifest, kms_key_id=None),
    )
    delete_prefix(client, out_bucket, "up2/")
    m = measured(
        "upload aws s3 cp",
        [*aws, "s3", "cp", "--recursive", "--only-show-errors", str(model_dir), f"s3://{out_bucket}/up3/"],
    )
    out["upload aws s3 cp"] = m.wall_s
    delete_prefix(client, out_bucket, "up3/")
    print()
    bench_common.print_table(
        ["transfer", "seconds", "MiB/s", "vs aws s3 cp"],
        [[k, v, size / v / MiB, out[f"{k.split()[0]} aws s3 cp"] / v] for k, v in out.items()],
        title=f"S3 throughput on the same {size / 1e9:.2f} GB (>1 in the last column = faster than aws s3 cp)",
    )
    return {"throughput_s": out, "throughput_bytes": size}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a ~30 M-parameter checkpoint instead of 1.24 B")
    parser.add_argument("--arch", choices=sorted(ARCHES), default="llama-3.2-1b",
                        help="architecture of the synthetic checkpoint (default %(default)s, 2.47 GB in 5 shards; "
                        "llama-3.2-3b is 6.4 GB in two shards of up to 5 GB)")  # fmt: skip
    parser.add_argument("--target", default="ml.g6.12xlarge", help="DeploymentInstanceType of the optjob job")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, spec)")
    parser.add_argument(
        "--file-granularity",
        action="store_true",
        help="also run the job on the shard-at-a-time path (OPTJOB_STREAM_GRANULARITY=file)",
    )
    parser.add_argument(
        "--memory-limit-mib",
        type=int,
        default=None,
        metavar="MIB",
        help="also run the job with optjob-worker inside a memory cgroup of MIB (0: a third of the "
        "model's size), and once more below libraries + budget (must fail clearly); needs root",
    )
    parser.add_argument(
        "--pin", action="store_true", help="also run (a') and (c) on CPU 1 with the S3 server pinned to CPU 0"
    )
    parser.add_argument("--skip-throughput", action="store_true", help="skip the S3 throughput comparison")
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="results file (default under the cache dir)")
    parser.add_argument("--baseline-worker", action="store_true", help=argparse.SUPPRESS)
    for flag in ("--src-uri", "--dst-uri"):
        parser.add_argument(flag, help=argparse.SUPPRESS)
    for flag in ("--tmp", "--result"):
        parser.add_argument(flag, type=Path, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    bench_common.exit_on_sigterm()
    if opts.baseline_worker:
        opts.result.write_text(json.dumps(baseline_worker(opts.src_uri, opts.dst_uri, opts.tmp)))
        return
    bench_common.save_result("bench_pipeline", run(opts), opts.json)


if __name__ == "__main__":
    main()
