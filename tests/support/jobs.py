"""Shared pieces of the job tests: a request factory, per-test data directories, a real executor.

Nothing here mocks the executor or the worker: ``executor`` runs the real ``Executor`` loop in a
thread of the test process, and it spawns real ``python -m optjob.jobs.worker`` processes. The
pipelines below are what those workers run (selected with ``OPTJOB_PIPELINE``) when a test needs
an outcome the real pipeline cannot reach without S3 and a model: success, a given failure, a
crash, or a worker that ignores SIGTERM. Stop and timeout tests use the real pipeline's
``OPTJOB_DEBUG_DELAY_SECONDS`` step.

This module holds no tests; test modules import its fixtures.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from optjob.api.errors import parse
from optjob.api.shapes import CreateOptimizationJobRequest
from optjob.errors import InputError
from optjob.jobs.daemon import ExecutorLock
from optjob.jobs.executor import Executor
from optjob.jobs.local_backend import is_same_process
from optjob.jobs.service import JobService
from optjob.jobs.store import JobRecord, Store
from optjob.pipeline.plan import Plan
from optjob.pipeline.run import DEBUG_DELAY_ENV, RunOutcome
from optjob.runtime.cancel import CancelToken
from optjob.runtime.events import EventSink
from optjob.settings import Settings, load_settings

PIPELINE = "tests.support.jobs"
TEST_IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/test-image:1"


def request_wire(name: str, **overrides: Any) -> dict[str, Any]:
    """A valid CreateOptimizationJob request (compilation for an L4 GPU target)."""
    wire: dict[str, Any] = {
        "OptimizationJobName": name,
        "RoleArn": "arn:aws:iam::123456789012:role/OptjobTests",
        "ModelSource": {"S3": {"S3Uri": "s3://models-bucket/llama/"}},
        "DeploymentInstanceType": "ml.g6.12xlarge",
        "OptimizationConfigs": [{"ModelCompilationConfig": {}}],
        "OutputConfig": {"S3OutputLocation": "s3://output-bucket/out/"},
        "StoppingCondition": {"MaxRuntimeInSeconds": 3600},
    }
    wire.update(overrides)
    return wire


def make_request(name: str, **overrides: Any) -> CreateOptimizationJobRequest:
    return parse(CreateOptimizationJobRequest, request_wire(name, **overrides))


def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def wait_status(service: JobService, name: str, *statuses: str, timeout: float = 15.0) -> JobRecord:
    """Wait until the job is in one of ``statuses``; fails fast if it ends in another terminal state."""

    def reached() -> JobRecord | None:
        record = service.get(name)
        if record.status in statuses:
            return record
        if record.terminal:
            raise AssertionError(f"{name} ended {record.status} ({record.failure_reason}), wanted {statuses}")
        return None

    return wait_for(reached, timeout)


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh OPTJOB_HOME and short limits; workers and daemons inherit them through the environment."""
    path = tmp_path / "optjob-home"
    monkeypatch.setenv("OPTJOB_HOME", str(path))
    monkeypatch.setenv("OPTJOB_STOP_GRACE_SECONDS", "1")
    monkeypatch.setenv("OPTJOB_EXECUTOR_IDLE_SECONDS", "2")
    monkeypatch.setenv("OPTJOB_EXECUTOR_SLOTS", "2")
    monkeypatch.setenv("OPTJOB_MAX_ACTIVE_JOBS", "5")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.delenv(DEBUG_DELAY_ENV, raising=False)
    monkeypatch.delenv("OPTJOB_PIPELINE", raising=False)
    return path


@pytest.fixture
def settings(home: Path) -> Settings:
    return load_settings()


@pytest.fixture
def service(settings: Settings) -> JobService:
    return JobService(settings, start_executor=False)


@contextmanager
def running_executor(settings: Settings, **kwargs: Any) -> Iterator[Executor]:
    """The real executor loop in a background thread; its workers are killed when the block ends."""
    runner = Executor(settings, poll_s=0.05, **kwargs)
    stop = threading.Event()
    thread = threading.Thread(target=runner.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield runner
    finally:
        stop.set()
        thread.join(timeout=10)
        for tracked in list(runner.workers.values()):
            tracked.kill()
            if getattr(tracked, "popen", None) is not None:
                tracked.popen.wait(timeout=10)


@pytest.fixture
def executor(settings: Settings) -> Iterator[Executor]:
    with running_executor(settings) as runner:
        yield runner


def kill_leftovers(settings: Settings) -> None:
    """Teardown for tests that start daemons: SIGKILL this home's executor and recorded workers.

    Every process killed here was started by the test (directly or through its daemon); each
    is identified by pid *and* start time, so an unrelated process that reused a pid is spared.
    """
    holder = ExecutorLock(settings).holder()
    if holder is not None and holder != os.getpid():
        with contextlib.suppress(ProcessLookupError):
            os.kill(holder, signal.SIGKILL)
    store = Store(settings.db_path)
    for record in store.active():
        if record.worker_pid and is_same_process(record.worker_pid, record.worker_ctime):
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.worker_pid, signal.SIGKILL)
    store.close()


def use_pipeline(monkeypatch: pytest.MonkeyPatch, name: str, **env: str) -> None:
    """Make workers started from now on run ``tests.support.jobs:<name>``."""
    monkeypatch.setenv("OPTJOB_PIPELINE", f"{PIPELINE}:{name}")
    for key, value in env.items():
        monkeypatch.setenv(key, value)


# --- pipelines the workers run (same signature as optjob.pipeline.run.run_plan) -----------------


def _work(plan: Plan, work_dir: Path, events: EventSink, cancel: CancelToken) -> None:
    """Write partial output, then report progress for TEST_PIPELINE_SECONDS, honouring Stop."""
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "partial.bin").write_bytes(b"half a model")
    seconds = float(os.environ.get("TEST_PIPELINE_SECONDS", "0.3"))
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < seconds:
        events("Compilation", "layers", elapsed / seconds, "compiling")
        if cancel.wait(0.05):
            break
    cancel.raise_if_cancelled()


def complete(plan: Plan, *, work_dir: Path, events: EventSink, cancel: CancelToken, **_: Any) -> RunOutcome:
    _work(plan, work_dir, events, cancel)
    return RunOutcome(recommended_image=TEST_IMAGE, published=[plan.output.s3_uri])


def input_error(plan: Plan, *, work_dir: Path, events: EventSink, cancel: CancelToken, **_: Any) -> RunOutcome:
    _work(plan, work_dir, events, cancel)
    raise InputError("config.json is missing from s3://models-bucket/llama/: upload the whole model directory")


def bug(plan: Plan, *, work_dir: Path, events: EventSink, cancel: CancelToken, **_: Any) -> RunOutcome:
    _work(plan, work_dir, events, cancel)
    raise RuntimeError("x" * 3000)


def crash(plan: Plan, *, work_dir: Path, events: EventSink, cancel: CancelToken, **_: Any) -> RunOutcome:
    _work(plan, work_dir, events, cancel)
    print("fatal: simulated native crash", flush=True)
    os._exit(7)


def stubborn(plan: Plan, *, work_dir: Path, events: EventSink, cancel: CancelToken, **_: Any) -> RunOutcome:
    """Ignores SIGTERM and never checks for cancellation: only SIGKILL ends it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "partial.bin").write_bytes(b"half a model")
    events("Compilation", "stuck", 0.1, "not listening")
    time.sleep(60)
    return RunOutcome(recommended_image=TEST_IMAGE)


def deaf(plan: Plan, *, work_dir: Path, events: EventSink, cancel: CancelToken, **_: Any) -> RunOutcome:
    """Keeps the worker's SIGTERM handler but sits in a call that never looks at it (a library that
    does not return): the cancellation is recorded and never seen."""
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "partial.bin").write_bytes(b"half a model")
    events("Compilation", "native", 0.1, "inside a call that does not return")
    time.sleep(600)
    return RunOutcome(recommended_image=TEST_IMAGE)
