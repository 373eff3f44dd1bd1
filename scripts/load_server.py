"""Load test of `optjob serve`: N concurrent boto3 clients create and describe jobs for T seconds.

Starts a real server on a loopback port with a fresh data directory, signs every request (SigV4),
and checks at the end that every job a client was told it created exists exactly once, and that
no request failed. Prints throughput and p50/p99 latency per operation.

    .venv/bin/python scripts/load_server.py --clients 50 --seconds 30

Traffic goes only to 127.0.0.1; the loop is bounded in time and stops by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import boto3
from botocore.config import Config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.server_process import ACCESS_KEY, SECRET_KEY, running_server  # noqa: E402

SPEC = json.loads((ROOT / "configs" / "examples" / "neuron-compile-inf2-48xlarge.json").read_text())
SPEC["ModelSource"] = {"S3": {"S3Uri": "s3://load-test/model/"}}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    args = parser.parse_args()

    latencies: dict[str, list[float]] = defaultdict(list)
    errors: list[str] = []
    created: list[str] = []
    lock = threading.Lock()

    with tempfile.TemporaryDirectory(prefix="optjob-load-") as home:
        # Jobs wait for a slot instead of running: the load is on the API, not on the pipeline.
        env = {"OPTJOB_MAX_ACTIVE_JOBS": "1000000", "OPTJOB_EXECUTOR_SLOTS": "1"}
        with running_server(Path(home), extra_env=env, args=("--workers", str(args.workers))) as server:
            deadline = time.monotonic() + args.seconds

            def client_loop(index: int) -> None:
                client = boto3.client(
                    "sagemaker",
                    endpoint_url=server.url,
                    region_name="us-east-1",
                    aws_access_key_id=ACCESS_KEY,
                    aws_secret_access_key=SECRET_KEY,
                    config=Config(parameter_validation=False, retries={"max_attempts": 1}, max_pool_connections=2),
                )
                sequence = 0
                while time.monotonic() < deadline:
                    name = f"load-{index}-{sequence}"
                    sequence += 1
                    calls = (
                        ("CreateOptimizationJob",
                         lambda n=name: client.create_optimization_job(**{**SPEC, "OptimizationJobName": n})),
                        ("DescribeOptimizationJob",
                         lambda n=name: client.describe_optimization_job(OptimizationJobName=n)),
                    )  # fmt: skip
                    for operation, call in calls:
                        started = time.perf_counter()
                        try:
                            call()
                        except Exception as exc:  # every failure is a finding: record it
                            with lock:
                                errors.append(f"{operation} {name}: {exc}")
                            continue
                        elapsed = time.perf_counter() - started
                        with lock:
                            latencies[operation].append(elapsed)
                            if operation == "CreateOptimizationJob":
                                created.append(name)

            threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(args.clients)]
            began = time.monotonic()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall = time.monotonic() - began

            lister = server.client()
            listed: list[str] = []
            for page in lister.get_paginator("list_optimization_jobs").paginate(NameContains="load-"):
                listed += [s["OptimizationJobName"] for s in page["OptimizationJobSummaries"]]

    total = sum(len(v) for v in latencies.values())
    print(f"optjob serve load test: {args.clients} clients, {args.seconds:g} s, {args.workers} uvicorn worker(s)")
    print(f"python {sys.version.split()[0]}, boto3 {boto3.__version__}, cpus {os.cpu_count()}")
    print(f"requests ok: {total} in {wall:.1f} s = {total / wall:.1f} req/s; errors: {len(errors)}")
    for operation, values in sorted(latencies.items()):
        print(
            f"  {operation:24s} n={len(values):6d}  p50={percentile(values, 0.5) * 1000:7.1f} ms  "
            f"p99={percentile(values, 0.99) * 1000:7.1f} ms  mean={statistics.fmean(values) * 1000:7.1f} ms"
        )
    duplicates = len(listed) - len(set(listed))
    lost = set(created) - set(listed)
    unexpected = set(listed) - set(created)
    print(f"jobs created: {len(created)}, listed: {len(listed)}, lost: {len(lost)}, duplicated: {duplicates}, "
          f"unexpected: {len(unexpected)}")
    for error in errors[:10]:
        print("  error:", error)
    return 0 if not errors and not lost and not duplicates and not unexpected else 1


if __name__ == "__main__":
    raise SystemExit(main())
