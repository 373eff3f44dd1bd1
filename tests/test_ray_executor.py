"""Jobs on a real multi-node Ray cluster on loopback: placement, capacity, Stop, timeouts, adoption.

The cluster (``optjob.testing.ray_cluster``) is Ray's own multi-node helper in a child process:
every node is a real raylet on 127.0.0.2 with its own resources. The head advertises no CPU, so
jobs never run on it and killing a worker node never takes the cluster down. Each test runs the
executor as the real control process (``python -m optjob.jobs.daemon`` with OPTJOB_EXECUTOR=ray),
so restarting it is a real process restart. Everything started is stopped by PID.
"""

# Fixtures are imported from tests.support.jobs, so their parameters shadow the imports.
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

import psutil
import pytest

from optjob.api.errors import parse
from optjob.api.shapes import CreateOptimizationJobRequest
from optjob.jobs.service import JobService
from optjob.settings import Settings
from optjob.storage.layout import MANIFEST_NAME, PROGRESS_NAME
from optjob.testing.ray_cluster import LoopbackRayCluster
from tests.support.jobs import home, make_request, settings, use_pipeline, wait_for, wait_status  # noqa: F401
from tests.support.s3server import S3Bucket
from tests.support.stages import fp8_job_request

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


def test_pending_timeout_stop_and_max_runtime_on_ray(
    settings: Settings, cluster: LoopbackRayCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_pipeline(monkeypatch, "complete", TEST_PIPELINE_SECONDS="60")
    service = JobService(settings, start_executor=False)
    if "neuron" not in cluster.nodes:  # the first test adds it after checking that no node had neuron_sdk
        cluster.add_node("neuron", num_cpus=1, resources={"neuron_sdk": 1})
    with control_process(settings, cluster):
        # The one neuron_sdk node is busy: a second Neuron job waits for it, past its pending limit.
        service.create(neuron_request("busy"))
        wait_status(service, "busy", "INPROGRESS", timeout=60)
        service.create(neuron_request("waits"))
        wait_for(lambda: lines(service, "waits", "placed"), timeout=30)
        # MaxPendingTimeInSeconds is at least 1800 s in the API; shorten this job's in the store.
        assert service.store.transition("waits", expect=("STARTING",), max_pending_s=2.0)
        failed = wait_status(service, "waits", "FAILED", timeout=30)
        assert failed.failure_reason.startswith(
            "CapacityError: no Ray node with {CPU: 1, memory: 4 GiB, neuron_sdk: 1}"
        )
        assert "MaxPendingTimeInSeconds (2 s)" in failed.failure_reason
        assert not lines(service, "waits", "started")

        # Stop: the worker gets SIGTERM through its actor, ends cleanly, publishes nothing.
        service.stop("busy")
        stopped = wait_status(service, "busy", "STOPPED", timeout=60)
        assert stopped.failure_reason is None
        assert lines(service, "busy", "SIGTERM") and not lines(service, "busy", "SIGKILL")
        wait_for(lambda: any("exited with status 4" in m for m in lines(service, "busy", "exited")), timeout=30)

        # MaxRuntimeInSeconds on Ray: STOPPING, then FAILED with the timeout reason; the node is free again.
        service.create(neuron_request("too-long", StoppingCondition={"MaxRuntimeInSeconds": 3}))
        timed_out = wait_status(service, "too-long", "FAILED", timeout=90)
        assert "MaxRuntimeInSeconds" in timed_out.failure_reason


def test_a_restarted_control_process_adopts_and_a_stubborn_worker_is_killed(
    settings: Settings, cluster: LoopbackRayCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_pipeline(monkeypatch, "complete", TEST_PIPELINE_SECONDS="6")
    service = JobService(settings, start_executor=False)
    with control_process(settings, cluster) as first:
        service.create(make_request("adopt-me"))
        wait_status(service, "adopt-me", "INPROGRESS", timeout=60)
        first.kill()  # the control process dies; the job's detached actor and its worker keep running
        first.wait()
    with control_process(settings, cluster):
        done = wait_status(service, "adopt-me", "COMPLETED", timeout=90)
        adopted = lines(service, "adopt-me", "adopted")
        assert len(adopted) == 1 and adopted[0].startswith("watching Ray actor optjob-job.adopt-me.1"), adopted
        assert done.attempts == 1  # adopted, not started again

    use_pipeline(monkeypatch, "stubborn")
    with control_process(settings, cluster):
        service.create(make_request("stubborn"))
        running = wait_status(service, "stubborn", "INPROGRESS", timeout=60)
        service.stop("stubborn")
        wait_status(service, "stubborn", "STOPPED", timeout=60)
        assert lines(service, "stubborn", "SIGKILL"), "the grace period passed: the actor is killed"
        wait_for(lambda: not psutil.pid_exists(running.worker_pid) or _zombie(running.worker_pid), timeout=30)


def _zombie(pid: int) -> bool:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    return True


def _object(bucket: S3Bucket, key: str) -> dict[str, Any] | None:
    try:
        return json.loads(bucket.client.get_object(Bucket=bucket.name, Key=key)["Body"].read())
    except bucket.client.exceptions.NoSuchKey:
        return None


def test_two_workers_split_a_job_and_a_job_whose_node_dies_is_retried_and_resumes(
    settings: Settings, cluster: LoopbackRayCluster, s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    """Runs last in this module: it kills a node."""
    from optjob.testing import build_tiny_llama

    if "neuron" not in cluster.nodes:
        cluster.add_node("neuron", num_cpus=1, resources={"neuron_sdk": 1})
    model = build_tiny_llama(tmp_path / "model", hidden=1024, intermediate=4096, layers=6, heads=8, kv_heads=4,
                             vocab=2048, shards=6, train_steps=0)  # fmt: skip
    s3_bucket.upload_dir(model, "model")
    source = s3_bucket.uri("model/")
    service = JobService(settings, start_executor=False)

    def files_of(prefix: str) -> dict[str, str]:
        return {f["path"]: f["sha256"] for f in _object(s3_bucket, f"{prefix}{MANIFEST_NAME}")["files"]}

    with control_process(settings, cluster):
        service.create(parse(CreateOptimizationJobRequest, fp8_job_request("clean", source, s3_bucket.uri("clean/"))))
        wait_status(service, "clean", "COMPLETED", timeout=600)

        # MaxInstanceCount=2: the job's worker and one helper (a Ray task on the other node) make the shards.
        two = {**fp8_job_request("two-workers", source, s3_bucket.uri("two/")), "MaxInstanceCount": 2}
        service.create(parse(CreateOptimizationJobRequest, two))
        wait_status(service, "two-workers", "COMPLETED", timeout=600)
        workers = _object(s3_bucket, f"two/{MANIFEST_NAME}")["metrics"]["1:Quantization"]["streaming"]["workers"]
        by_helpers = workers["shards_by_helpers"]
        assert workers["helper_slots"] == 1 and by_helpers and not workers["helper_failures"], workers
        primary = lines(service, "two-workers", "started")[0]
        assert all(entry["node"].split("(node ")[1][:12] not in primary for entry in by_helpers.values()), workers
        assert files_of("two/") == files_of("clean/")

        service.create(
            parse(CreateOptimizationJobRequest, fp8_job_request("lose-a-node", source, s3_bucket.uri("out/")))
        )
        wait_for(lambda: (_object(s3_bucket, f"out/{PROGRESS_NAME}") or {}).get("units"), timeout=300, interval=0.02)
        started = lines(service, "lose-a-node", "started")
        victim = next(name for name, node in cluster.nodes.items() if node["node_id"][:12] in started[0])
        assert victim != "head"
        cluster.kill_node(victim)
        done_before = sorted(_object(s3_bucket, f"out/{PROGRESS_NAME}")["units"])

        record = wait_status(service, "lose-a-node", "COMPLETED", timeout=600)
        assert record.attempts == 2
        assert any("attempt 1 of 3 lost its node" in m for m in lines(service, "lose-a-node", "retrying"))
        second = lines(service, "lose-a-node", "started")[-1]
        assert cluster.nodes[victim]["node_id"][:12] not in second
        # Never two live attempts: the first attempt's worker, cut off from its node, saw that the job was
        # handed on and left (touching nothing) before the second attempt claimed the job.
        entries = journal(service, "lose-a-node")
        claims = [e for e in entries if e.get("step") == "INPROGRESS"]
        first_pid = int(claims[0]["message"].split()[2])
        left = [e["time"] for e in entries if e.get("step") == "disowned"]
        assert not left or left[0] < claims[1]["time"], (left, claims)
        assert wait_for(lambda: not psutil.pid_exists(first_pid) or _zombie(first_pid), timeout=30)

    manifest = _object(s3_bucket, f"out/{MANIFEST_NAME}")
    stage = manifest["metrics"]["1:Quantization"]
    assert stage["streaming"]["attempt"] == 2 and set(done_before) <= set(stage["streaming"]["resumed_files"])
    assert files_of("out/") == files_of("clean/")
    assert _object(s3_bucket, f"out/{PROGRESS_NAME}") is None
