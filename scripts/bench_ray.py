"""Figures for the Ray executor and resume (issue #14), each against a baseline measured in the same run.

1. Job-start overhead: Create -> INPROGRESS (the worker's claim) and Create -> COMPLETED for the same
   small FP8 job on the local executor and on a two-node Ray cluster on loopback (127.0.0.2).
2. Resume: a data-free FP8 job run by ``optjob-worker`` (what a batch scheduler runs) is SIGKILLed
   once about half of its output shards are recorded, then run again; the second run's time against
   an uninterrupted run, next to the share of the work that was left.
3. Two workers vs one: the same FP8 job on a two-node Ray cluster (one CPU each) with
   MaxInstanceCount 1 and 2 (on a 2-core machine both nodes share the same two cores).

Run: .venv/bin/python scripts/bench_ray.py [--hidden 2048 --layers 8 --shards 8 --repeat 3]
Everything talks to loopback only: SeaweedFS started here, Ray nodes on 127.0.0.2, stopped by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import REPO_ROOT  # noqa: E402

from optjob.api.errors import parse  # noqa: E402
from optjob.api.shapes import CreateOptimizationJobRequest  # noqa: E402
from optjob.jobs.service import JobService  # noqa: E402
from optjob.settings import load_settings  # noqa: E402
from optjob.storage.layout import PROGRESS_NAME  # noqa: E402
from optjob.testing import build_tiny_llama  # noqa: E402
from optjob.testing.ray_cluster import LoopbackRayCluster  # noqa: E402
from tests.support.s3server import run_weed_mini  # noqa: E402
from tests.support.stages import fp8_job_request  # noqa: E402


def upload(client: Any, bucket: str, model: Path) -> str:
    for path in sorted(model.iterdir()):
        client.upload_file(str(path), bucket, f"model/{path.name}")
    return f"s3://{bucket}/model/"


def start_overhead(kind: str, home: Path, env: dict[str, str], source: str, bucket: str, repeat: int,
                   instances: int = 1) -> list[dict]:  # fmt: skip
    """Jobs one after another through the real control process of ``kind``; times from the store."""
    home.mkdir(parents=True, exist_ok=True)
    env = {**env, "OPTJOB_HOME": str(home)}
    with open(home / "daemon.log", "ab") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "optjob.jobs.daemon", "--forever"], env=env, stdout=log,
                                  stderr=subprocess.STDOUT)  # fmt: skip
    os.environ["OPTJOB_HOME"] = str(home)
    service = JobService(load_settings(), start_executor=False)
    rows = []
    try:
        for index in range(repeat):
            name = f"{kind}-{index}"
            wire = {**fp8_job_request(name, source, f"s3://{bucket}/{name}/"), "MaxInstanceCount": instances}
            created = time.time()
            service.create(parse(CreateOptimizationJobRequest, wire))
            while (record := service.get(name)).status in ("STARTING", "INPROGRESS"):
                time.sleep(0.02)
            if record.status != "COMPLETED":
                raise SystemExit(f"{name} ended {record.status}: {record.failure_reason}")
            rows.append(
                {"claim_s": round(record.start_time - created, 2), "job_s": round(record.end_time - created, 2)}
            )
            print(f"  {kind:5s} job {index}: Create->INPROGRESS {rows[-1]['claim_s']:.2f} s, "
                  f"Create->COMPLETED {rows[-1]['job_s']:.2f} s", flush=True)  # fmt: skip
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
    return rows


def worker_run(spec: Path, env: dict[str, str], work: Path, home: Path) -> subprocess.Popen:
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "worker.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "workers", "--spec", str(spec), "--work-dir", str(work)],
            cwd=REPO_ROOT, env={**env, "OPTJOB_HOME": str(home)}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def finished(proc: subprocess.Popen, home: Path) -> None:
    if proc.wait() != 0:
        raise SystemExit("optjob-worker failed:\n" + (home / "worker.log").read_text()[-3000:])


def progress(client: Any, bucket: str, prefix: str) -> dict | None:
    try:
        return json.loads(client.get_object(Bucket=bucket, Key=f"{prefix}{PROGRESS_NAME}")["Body"].read())
    except client.exceptions.NoSuchKey:
        return None


def resume_figures(tmp: Path, env: dict[str, str], client: Any, source: str, bucket: str, shards: int) -> dict:
    def spec(prefix: str) -> Path:
        path = tmp / f"{prefix}.json"
        path.write_text(json.dumps(fp8_job_request("resume-bench", source, f"s3://{bucket}/{prefix}/")))
        return path

    started = time.monotonic()
    full = worker_run(spec("full"), env, tmp / "w-full", tmp / "h-full")
    finished(full, tmp / "h-full")
    full_s = time.monotonic() - started

    target = max(1, shards // 2)
    first = worker_run(spec("cut"), env, tmp / "w-cut", tmp / "h-cut")
    while len((progress(client, bucket, "cut/") or {}).get("units", {})) < target:
        assert first.poll() is None, "the job finished before half its shards were recorded"
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    units = progress(client, bucket, "cut/")["units"]
    sizes = {
        o["Key"].rsplit("/", 1)[-1]: o["Size"]
        for o in client.list_objects_v2(Bucket=bucket, Prefix="full/")["Contents"]
    }
    weights = sum(size for name, size in sizes.items() if name.endswith(".safetensors"))
    done = sum(sizes.get(name.rsplit("/", 1)[-1], 0) for name in units)
    started = time.monotonic()
    second = worker_run(spec("cut"), env, tmp / "w-cut2", tmp / "h-cut")
    finished(second, tmp / "h-cut")
    resumed_s = time.monotonic() - started
    return {
        "full_s": round(full_s, 1), "resumed_s": round(resumed_s, 1), "ratio": round(resumed_s / full_s, 2),
        "shards_done_before_kill": len(units), "shards": shards, "work_left": round(1 - done / weights, 2),
    }  # fmt: skip


def median(rows: list[dict], key: str) -> float:
    return sorted(row[key] for row in rows)[len(rows) // 2]


def start_figures(tmp: Path, env: dict[str, str], client: Any, repeat: int) -> dict:
    small = build_tiny_llama(tmp / "small", hidden=512, intermediate=1024, layers=4, shards=2, train_steps=0)
    client.create_bucket(Bucket="bench")
    small_uri = upload(client, "bench", small)
    print("1. job-start overhead (small FP8 job, one at a time)", flush=True)
    local = start_overhead("local", tmp / "home-local", env, small_uri, "bench", repeat)
    with LoopbackRayCluster(tmp / "rc", {"head": {"num_cpus": 0}, "node-a": {"num_cpus": 1}}) as cluster:
        ray = start_overhead("ray", tmp / "home-ray", {**env, **cluster.environment()}, small_uri, "bench", repeat)
    start = {
        "local_claim_s": median(local, "claim_s"), "ray_claim_s": median(ray, "claim_s"),
        "local_job_s": median(local, "job_s"), "ray_job_s": median(ray, "job_s"),
    }  # fmt: skip
    start["ray_minus_local_claim_s"] = round(start["ray_claim_s"] - start["local_claim_s"], 2)
    start["job_ratio_ray_over_local"] = round(start["ray_job_s"] / start["local_job_s"], 2)
    print(f"   median Create->INPROGRESS: local {start['local_claim_s']} s, Ray {start['ray_claim_s']} s "
          f"(+{start['ray_minus_local_claim_s']} s); "
          f"whole job Ray/local {start['job_ratio_ray_over_local']}x")  # fmt: skip
    return start


def big_model(tmp: Path, client: Any, opts: argparse.Namespace) -> str:
    """The resume and workers sections' model, built and uploaded once."""
    if not (tmp / "model").exists():
        model = build_tiny_llama(tmp / "model", hidden=opts.hidden, intermediate=opts.hidden * 11 // 4,
                                 layers=opts.layers, heads=16, kv_heads=8, vocab=opts.vocab, shards=opts.shards,
                                 train_steps=0)  # fmt: skip
        client.create_bucket(Bucket="resume")
        upload(client, "resume", model)
    return "s3://resume/model/"


def resume_section(tmp: Path, env: dict[str, str], client: Any, opts: argparse.Namespace) -> dict:
    print(f"2. resume (optjob-worker, hidden {opts.hidden}, {opts.layers} layers, {opts.shards} shards)", flush=True)
    uri = big_model(tmp, client, opts)
    resume = resume_figures(tmp, env, client, uri, "resume", opts.shards)
    print(f"   uninterrupted {resume['full_s']} s; resumed after {resume['shards_done_before_kill']} of "
          f"{resume['shards']} shards: {resume['resumed_s']} s = {resume['ratio']}x of a full run, with "
          f"{resume['work_left']:.0%} of the weights left to do")  # fmt: skip
    return resume


def workers_section(tmp: Path, env: dict[str, str], client: Any, opts: argparse.Namespace) -> dict:
    print("3. MaxInstanceCount 2 vs 1 on a two-node Ray cluster (one CPU per node, the same FP8 job)", flush=True)
    uri = big_model(tmp, client, opts)
    nodes = {"head": {"num_cpus": 0}, "node-a": {"num_cpus": 1}, "node-b": {"num_cpus": 1}}
    with LoopbackRayCluster(tmp / "rc2", nodes) as cluster:
        ray_env = {**env, **cluster.environment()}
        one = start_overhead("one", tmp / "home-w1", ray_env, uri, "resume", 1, instances=1)[0]["job_s"]
        two = start_overhead("two", tmp / "home-w2", ray_env, uri, "resume", 1, instances=2)[0]["job_s"]
    manifest = json.loads(client.get_object(Bucket="resume", Key="two-0/optjob-manifest.json")["Body"].read())
    made = manifest["metrics"]["1:Quantization"]["streaming"]["workers"]["shards_by_helpers"]
    figures = {"one_worker_s": one, "two_workers_s": two, "speedup": round(one / two, 2),
               "shards_by_the_helper": len(made), "shards": opts.shards}  # fmt: skip
    print(f"   1 worker {one} s, 2 workers {two} s: {figures['speedup']}x; the helper made {len(made)} of "
          f"{opts.shards} shards")  # fmt: skip
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-start", action="store_true", help="leave out section 1")
    parser.add_argument("--skip-resume", action="store_true", help="leave out section 2")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as scratch, run_weed_mini() as server:
        tmp = Path(scratch)
        env = {**os.environ, **server.aws_env(), "RAY_USAGE_STATS_ENABLED": "0"}
        for variable in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "OPTJOB_EXECUTOR", "RAY_ADDRESS"):
            env.pop(variable, None)
        os.environ.update(server.aws_env())
        client = server.client()
        figures = {} if opts.skip_start else {"start_overhead": start_figures(tmp, env, client, opts.repeat)}
        if not opts.skip_resume:
            figures["resume"] = resume_section(tmp, env, client, opts)
        figures["workers"] = workers_section(tmp, env, client, opts)
        print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
