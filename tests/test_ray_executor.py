"""Jobs on a real multi-node Ray cluster on loopback: placement, capacity, Stop, timeouts, adoption.

The cluster (``optjob.testing.ray_cluster``) is Ray's own multi-node helper in a child process:
every node is a real raylet on 127.0.0.2 with its own resources. The head advertises no CPU, so
jobs never run on it and killing a worker node never takes the cluster down. Each test runs the
executor as the real control process (``python -m optjob.jobs.daemon`` with OPTJOB_EXECUTOR=ray),
so restarting it is a real process restart. Everything started is stopped by PID.
"""

# Fixtures are imported from tests.test_jobs_support, so their parameters shadow the imports.
# ruff: noqa: F811

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from optjob.jobs.service import JobService
from optjob.settings import Settings
from optjob.testing.ray_cluster import LoopbackRayCluster
from tests.test_jobs_support import home, make_request, settings, use_pipeline, wait_for, wait_status  # noqa: F401

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackRayCluster]:
    with LoopbackRayCluster(
        tmp_path_factory.mktemp("rc"), {"head": {"num_cpus": 0}, "cpu-a": {"num_cpus": 1}}
    ) as running:
        yield running


@contextlib.contextmanager
def control_process(settings: Settings, cluster: LoopbackRayCluster) -> Iterator[subprocess.Popen[bytes]]:
    """The executor daemon on the Ray backend, as ``optjob serve --executor ray`` runs it."""
    env = {**os.environ, **cluster.environment(), "OPTJOB_HOME": str(settings.home)}
    log = open(settings.home / "daemon.log", "ab")  # noqa: SIM115 - closed below
    settings.home.mkdir(parents=True, exist_ok=True)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "optjob.jobs.daemon", "--forever"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        yield daemon
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        log.close()


def journal(service: JobService, name: str) -> list[dict[str, Any]]:
    path = Path(service.get(name).log_path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def lines(service: JobService, name: str, step: str) -> list[str]:
    return [entry["message"] for entry in journal(service, name) if entry.get("step") == step]


def neuron_request(name: str, **overrides: Any):
    return make_request(
        name,
        DeploymentInstanceType="ml.inf2.48xlarge",
        OptimizationConfigs=[
            {"ModelCompilationConfig": {"OverrideEnvironment": {"OPTION_TENSOR_PARALLEL_DEGREE": "2"}}}
        ],
        **overrides,
    )


def test_placement_by_resources_and_a_job_no_node_can_run(
    settings: Settings, cluster: LoopbackRayCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_pipeline(monkeypatch, "complete", TEST_PIPELINE_SECONDS="0.5")
    service = JobService(settings, start_executor=False)
    with control_process(settings, cluster):
        # A Neuron compilation needs the neuron_sdk resource; no node has it: CapacityError at once.
        service.create(neuron_request("needs-neuron"))
        failed = wait_status(service, "needs-neuron", "FAILED", timeout=60)
        assert failed.failure_reason.startswith("CapacityError: no node of the Ray cluster has")
        assert "neuron_sdk (Compilation drives neuron_env)" in failed.failure_reason

        # A node that advertises it joins; the same kind of job is placed there and nowhere else.
        neuron_node = cluster.add_node("neuron", num_cpus=1, resources={"neuron_sdk": 1})
        service.create(neuron_request("on-neuron"))
        wait_status(service, "on-neuron", "COMPLETED", timeout=90)
        started = lines(service, "on-neuron", "started")
        assert len(started) == 1 and neuron_node["node_id"][:12] in started[0], started

        # A data-free quantization asks only for a CPU and streaming memory.
        fp8 = {
            "ModelQuantizationConfig": {
                "OverrideEnvironment": {"OPTION_QUANTIZE": "fp8", "OPTION_FP8_SCHEME": "FP8_DYNAMIC"}
            }
        }
        service.create(make_request("fp8", OptimizationConfigs=[fp8]))
        wait_status(service, "fp8", "COMPLETED", timeout=90)
        placed = lines(service, "fp8", "placed")
        assert placed == ["attempt 1 of 3: Ray actor optjob-job.fp8.1 asks for {CPU: 1, memory: 1 GiB}"], placed
        record = service.get("fp8")
        assert (record.attempts, record.executor_ref) == (1, "optjob-job.fp8.1")
