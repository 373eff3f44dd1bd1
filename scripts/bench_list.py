"""Benchmark ListOptimizationJobs over 1,000 stored jobs: per-page latency with filters and pagination.

Not a test: run it by hand (``.venv/bin/python scripts/bench_list.py``). It fills a throwaway
OPTJOB_HOME with jobs created through the real service (validation, planner and all) in a mix of
statuses and techniques, then pages through several filtered/sorted listings via
``JobService.handle`` — the exact call the HTTP server makes, including request parsing and the
wire dump — and prints median / p95 / max milliseconds per page. Target: < 100 ms per page.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from optjob.api.errors import parse  # noqa: E402
from optjob.api.shapes import CreateOptimizationJobRequest  # noqa: E402
from optjob.jobs.service import JobService  # noqa: E402
from optjob.settings import load_settings  # noqa: E402

CONFIGS: list[list[dict[str, Any]]] = [
    [{"ModelCompilationConfig": {}}],
    [{"ModelShardingConfig": {"OverrideEnvironment": {"OPTION_TENSOR_PARALLEL_DEGREE": "2"}}}],
    [{"ModelSpeculativeDecodingConfig": {"Technique": "EAGLE"}}],
]
FINAL = ["COMPLETED", "FAILED", "STOPPED", "INPROGRESS"]


def populate(service: JobService, count: int) -> float:
    base = time.time() - count
    for index in range(count):
        name = f"{['llama', 'qwen', 'mistral', 'gemma'][index % 4]}-job-{index:05d}"
        wire = {
            "OptimizationJobName": name,
            "RoleArn": "arn:aws:iam::123456789012:role/Bench",
            "ModelSource": {"S3": {"S3Uri": "s3://models-bucket/model/"}},
            "DeploymentInstanceType": "ml.g6.12xlarge",
            "OptimizationConfigs": CONFIGS[index % len(CONFIGS)],
            "OutputConfig": {"S3OutputLocation": f"s3://output-bucket/{name}/"},
            "StoppingCondition": {"MaxRuntimeInSeconds": 3600},
        }
        service.create(parse(CreateOptimizationJobRequest, wire))
        status = FINAL[index % len(FINAL)]
        extra = {"failure_reason": "bench"} if status == "FAILED" else {}
        service.store.transition(name, expect=("STARTING",), to=status, now=base + index, **extra)
    return base


def page_through(service: JobService, wire: dict[str, Any]) -> tuple[list[float], int]:
    timings: list[float] = []
    items = 0
    token = None
    while True:
        request = dict(wire) | ({"NextToken": token} if token else {})
        started = time.perf_counter()
        response = service.handle("ListOptimizationJobs", request)
        timings.append((time.perf_counter() - started) * 1000)
        items += len(response["OptimizationJobSummaries"])
        token = response.get("NextToken")
        if not token:
            return timings, items


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="optjob-bench-") as home:
        os.environ["OPTJOB_HOME"] = home
        settings = load_settings(max_active_jobs=args.jobs + 1)
        service = JobService(settings, start_executor=False)
        started = time.perf_counter()
        base = populate(service, args.jobs)
        print(f"created {args.jobs} jobs in {time.perf_counter() - started:.1f} s ({settings.db_path})")
        scenarios: dict[str, dict[str, Any]] = {
            "all, default sort, 50/page": {},
            "all, Name desc, 100/page": {"SortBy": "Name", "SortOrder": "Descending", "MaxResults": 100},
            "all, Status asc, 20/page": {"SortBy": "Status", "MaxResults": 20},
            "StatusEquals=COMPLETED, 50/page": {"StatusEquals": "COMPLETED"},
            "NameContains=llama + OptimizationContains=compil": {
                "NameContains": "llama",
                "OptimizationContains": "compil",
                "MaxResults": 10,
            },
            "CreationTime window + LastModifiedAfter, desc": {
                "CreationTimeAfter": base - 3600,
                "CreationTimeBefore": time.time() + 3600,
                "LastModifiedTimeAfter": base + args.jobs / 2,
                "SortOrder": "Descending",
                "MaxResults": 25,
            },
        }
        print(f"{'scenario':<52} {'pages':>5} {'items':>5} {'median':>8} {'p95':>8} {'max':>8}  (ms/page)")
        worst = 0.0
        for label, wire in scenarios.items():
            page_through(service, wire)  # warm the page cache and pydantic's validators
            timings, items = page_through(service, wire)
            ordered = sorted(timings)
            p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
            worst = max(worst, ordered[-1])
            print(
                f"{label:<52} {len(timings):>5} {items:>5} {statistics.median(timings):>8.2f} "
                f"{p95:>8.2f} {ordered[-1]:>8.2f}"
            )
        print(f"worst page: {worst:.2f} ms ({'within' if worst < 100 else 'OVER'} the 100 ms target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
