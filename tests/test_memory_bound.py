"""A streaming FP8 job under a real kernel memory limit (a cgroup), as a container would run it.

The job runs as ``optjob-worker --spec`` (the container entrypoint) inside a memory cgroup. With the limit at what
the worker's libraries take plus the streaming budget (configs/streaming.yaml) and a margin, it
completes, and the tensor-granular path kept its own growth under the budget. With the limit
below that, it fails before any work with a reason that says it is memory and by how much, the
kernel never had to kill it, and nothing was published.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from optjob.config_files import load_config
from optjob.testing.memory_cgroup import MemoryCgroup
from tests.support.s3server import S3Bucket
from tests.support.stages import fp8_job_request

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
pytestmark = pytest.mark.skipif(bool(MemoryCgroup.available()), reason=str(MemoryCgroup.available()))


def _spec(tmp_path: Path, name: str, source: str, output: str) -> Path:
    spec = fp8_job_request(name, source, output)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(spec))
    return path


def _run_limited(
    spec: Path, bucket: S3Bucket, tmp_path: Path, limit_mib: int
) -> tuple[subprocess.CompletedProcess, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "OPTJOB_"))}
    env.update(bucket.server.aws_env(), OPTJOB_HOME=str(tmp_path / f"home-{spec.stem}"))
    with MemoryCgroup(limit_mib * MiB) as group:
        result = subprocess.run(
            [sys.executable, "-m", "workers", "--spec", str(spec), "--work-dir", str(tmp_path / f"work-{spec.stem}")],
            cwd=ROOT, env=env, text=True,
            capture_output=True, timeout=600, preexec_fn=group.preexec,
        )  # fmt: skip
        return result, group.oom_kills()


def _manifest(bucket: S3Bucket, prefix: str) -> dict:
    return json.loads(bucket.client.get_object(Bucket=bucket.name, Key=f"{prefix}optjob-manifest.json")["Body"].read())


def test_a_streaming_job_fits_its_budget_under_a_memory_limit_and_fails_clearly_below_it(
    s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    from optjob.testing import build_tiny_llama

    model = build_tiny_llama(tmp_path / "model", hidden=512, intermediate=1536, layers=4, heads=4, kv_heads=2,
                             vocab=4096, shards=3, train_steps=0)  # fmt: skip
    s3_bucket.upload_dir(model, "model")
    budget = int(load_config("streaming.yaml")["memory_budget_mib"])

    # A loose limit first, to learn what the worker's libraries take on this host.
    result, kills = _run_limited(_spec(tmp_path, "loose", s3_bucket.uri("model/"), s3_bucket.uri("loose/")),
                                 s3_bucket, tmp_path, 4096)  # fmt: skip
    assert result.returncode == 0 and kills == 0, result.stderr[-3000:]
    stage = _manifest(s3_bucket, "loose/")["metrics"]["1:Quantization"]
    memory = stage["streaming"]["memory"]
    assert memory["limit_mib"] == 4096
    # In use when the stream starts: the supervisor process and this worker's libraries (anonymous memory).
    in_use = memory["limit_mib"] - memory["headroom_mib"]
    assert in_use >= memory["rss_before_mib"] * 0.8
    assert stage["engine_details"]["stream_peak_rss_above_start_mib"] < budget  # the stream's growth

    # What is in use + budget + room for the gate and the interpreter's slack: completes, never killed.
    tight = int(in_use + budget + 160)
    result, kills = _run_limited(_spec(tmp_path, "tight", s3_bucket.uri("model/"), s3_bucket.uri("tight/")),
                                 s3_bucket, tmp_path, tight)  # fmt: skip
    assert result.returncode == 0 and kills == 0, (tight, result.stderr[-3000:])
    assert _manifest(s3_bucket, "tight/")["metrics"]["1:Quantization"]["verification"]["passed"]

    # Below the budget: a clear FAILED before any work, not a SIGKILL, and nothing published.
    low = int(in_use + budget // 3)
    result, kills = _run_limited(_spec(tmp_path, "low", s3_bucket.uri("model/"), s3_bucket.uri("low/")),
                                 s3_bucket, tmp_path, low)  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode != 0 and kills == 0, output[-3000:]
    assert "Out of memory before starting: the worker's memory limit is" in output, output[-3000:]
    assert f"needs {budget} MiB more" in output
    # Only the worker's status object (FAILED, with the reason) is there: no model, no open upload.
    assert s3_bucket.keys("low/") == ["low/optjob-status.json"] and s3_bucket.multipart_uploads("low/") == []
    status = json.loads(s3_bucket.client.get_object(Bucket=s3_bucket.name, Key="low/optjob-status.json")["Body"].read())
    assert "Out of memory before starting" in json.dumps(status), status
