"""Every lifecycle transition with real worker processes, real signals and the real executor loop.

STARTING -> INPROGRESS -> COMPLETED | FAILED; STARTING | INPROGRESS -> STOPPING -> STOPPED;
INPROGRESS -> STOPPING -> FAILED (MaxRuntimeExceeded); STARTING -> FAILED (CapacityError); a
worker killed by a signal or crashing; SIGTERM that was not a Stop; a Stop racing completion.
"""

# Fixtures are imported from tests.support.jobs, so their parameters shadow the imports.
# ruff: noqa: F811

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from optjob.api.errors import ValidationException
from optjob.jobs.executor import Executor
from optjob.jobs.logs import follow
from optjob.jobs.outcomes import MAX_FAILURE_REASON, reason_problems
from optjob.jobs.service import JobService
from optjob.jobs.store import JobRecord
from optjob.jobs.worker import Worker
from optjob.pipeline.run import DEBUG_DELAY_ENV, RunOutcome
from optjob.runtime.cancel import CancelToken
from optjob.settings import Settings, load_settings
from tests.support.jobs import (  # noqa: F401
    TEST_IMAGE,
    executor,
    home,
    make_request,
    running_executor,
    service,
    settings,
    use_pipeline,
    wait_for,
    wait_status,
)


def formed(reason: str | None) -> str:
    """The FailureReason, after checking its form: one sentence a person can act on, no traceback."""
    assert reason, "no FailureReason"
    assert reason_problems(reason) == [], (reason, reason_problems(reason))
    return reason


def log_records(record: JobRecord) -> list[dict]:
    return list(follow(Path(record.log_path), done=lambda: True, follow=False))


def steps(record: JobRecord, stage: str) -> list[str]:
    return [r["step"] for r in log_records(record) if r.get("stage") == stage]


def scratch(settings: Settings, name: str) -> Path:
    return settings.work_root / name


def test_runs_to_completed_with_progress_and_times(
    service: JobService, executor: Executor, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_pipeline(monkeypatch, "complete", TEST_PIPELINE_SECONDS="1.0")
    service.create(make_request("good"))
    running = wait_status(service, "good", "INPROGRESS")
    assert running.worker_pid and running.start_time
    described = service.describe("good").dump()
    assert "OptimizationStartTime" in described and "OptimizationEndTime" not in described
    wait_for(lambda: service.get("good").last_event)  # progress reaches the store while it runs
    event = service.get("good").last_event
    assert event["stage"] == "Compilation" and 0 <= event["fraction"] <= 1

    done = wait_status(service, "good", "COMPLETED")
    described = service.describe("good").dump()
    assert described["OptimizationOutput"] == {"RecommendedInferenceImage": TEST_IMAGE}
    assert described["OptimizationStartTime"] <= described["OptimizationEndTime"] == described["LastModifiedTime"]
    assert "FailureReason" not in described
    assert steps(done, "lifecycle") == ["STARTING", "INPROGRESS", "COMPLETED"]
    progress = [r for r in log_records(done) if r.get("stage") == "Compilation"]
    assert progress and all({"time", "step", "fraction"} <= set(r) for r in progress)
    assert any("eta_s" in r for r in progress)
    wait_for(lambda: "exited" in steps(service.get("good"), "executor"))
    assert not scratch(settings, "good").exists()


def test_pipeline_failure_is_failed_with_its_reason(
    service: JobService, executor: Executor, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_pipeline(monkeypatch, "input_error")
    service.create(make_request("bad-input"))
    record = wait_status(service, "bad-input", "FAILED")
    assert formed(service.describe("bad-input").failure_reason) == (
        "config.json is missing from s3://models-bucket/llama/: upload the whole model directory."
    )
    assert record.start_time is not None and record.end_time is not None


def test_unexpected_exception_is_internal_error(
    service: JobService, executor: Executor, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_pipeline(monkeypatch, "bug")
    service.create(make_request("buggy"))
    record = wait_status(service, "buggy", "FAILED")
    reason = formed(service.describe("buggy").failure_reason)
    assert reason.startswith("internal error: RuntimeError: xxx") and len(reason) <= MAX_FAILURE_REASON
    assert "This is a bug in optjob" in reason and "optjob logs buggy" in reason
    assert any("Traceback" in r.get("traceback", "") for r in log_records(record))


def test_real_pipeline_failure_reaches_describe(
    service: JobService, executor: Executor, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The pipeline that exists today, unpatched: no credentials, so fetching the source fails."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    service.create(make_request("no-creds"))
    wait_status(service, "no-creds", "FAILED", timeout=30)
    reason = formed(service.describe("no-creds").failure_reason)
    assert reason and len(reason) <= MAX_FAILURE_REASON


def test_stop_inprogress_sends_sigterm_and_ends_stopped(
    service: JobService, executor: Executor, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DEBUG_DELAY_ENV, "30")  # the real pipeline's slow first step
    service.create(make_request("long"))
    wait_for(lambda: service.get("long").last_event)  # the pipeline is in its slow step
    started = time.monotonic()
    service.stop("long")
    record = wait_status(service, "long", "STOPPED")
    assert time.monotonic() - started < 5
    described = service.describe("long").dump()
    assert "FailureReason" not in described and "OptimizationEndTime" in described
    assert "SIGTERM" in steps(record, "executor") and "SIGKILL" not in steps(record, "executor")
    assert steps(record, "lifecycle")[-2:] == ["STOPPING", "STOPPED"]
    wait_for(lambda: not scratch(settings, "long").exists())


def test_stop_starting_job_before_any_worker(service: JobService, settings: Settings) -> None:
    service.create(make_request("queued"))
    service.stop("queued")
    assert service.get("queued").status == "STOPPING"
    with running_executor(settings):
        record = wait_status(service, "queued", "STOPPED")
    assert record.start_time is None and record.worker_pid is None
    assert "OptimizationStartTime" not in service.describe("queued").dump()


def test_stop_escalates_to_sigkill_after_grace(
    service: JobService, executor: Executor, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_pipeline(monkeypatch, "stubborn")
    service.create(make_request("deaf"))
    wait_for(lambda: service.get("deaf").last_event)
    assert (scratch(settings, "deaf") / "partial.bin").exists()
    service.stop("deaf")
    time.sleep(0.5)  # within the 1 s grace it is still STOPPING
    assert service.get("deaf").status == "STOPPING"
    record = wait_status(service, "deaf", "STOPPED")
    assert steps(record, "executor")[-3:] == ["SIGTERM", "SIGKILL", "exited"]
    assert not scratch(settings, "deaf").exists()  # partial output removed, never published


@pytest.mark.parametrize("pipeline", ["real", "stubborn"])
def test_max_runtime_ends_failed_with_reason(
    service: JobService, executor: Executor, monkeypatch: pytest.MonkeyPatch, pipeline: str
) -> None:
    if pipeline == "real":
        monkeypatch.setenv(DEBUG_DELAY_ENV, "30")
    else:
        use_pipeline(monkeypatch, "stubborn")
    service.create(make_request("slow", StoppingCondition={"MaxRuntimeInSeconds": 1}))
    record = wait_status(service, "slow", "FAILED")
    reason = formed(service.describe("slow").failure_reason)
    assert reason.startswith("MaxRuntimeExceeded: the job ran longer than StoppingCondition.MaxRuntimeInSeconds (1 s)")
    assert record.end_time is not None and record.start_time is not None
    assert record.end_time - record.start_time >= 1
    logged = log_records(record)
    assert any(r.get("step") == "FAILED" and r["message"].startswith("MaxRuntimeExceeded") for r in logged)
    assert any("MaxRuntimeInSeconds (1 s) reached" in r.get("message", "") for r in logged)


def test_max_pending_time_ends_failed_with_capacity_error(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(executor_slots=1, stop_grace_s=1.0)
    service = JobService(settings, start_executor=False)
    monkeypatch.setenv(DEBUG_DELAY_ENV, "30")
    service.create(make_request("hog"))
    service.create(make_request("waiter", StoppingCondition={"MaxPendingTimeInSeconds": 1800}))
    with running_executor(settings):
        wait_status(service, "hog", "INPROGRESS")
        time.sleep(0.3)
        assert service.get("waiter").status == "STARTING"  # no free slot, still within its pending time
        # The API's minimum is 1800 s: age the job instead of waiting half an hour.
        with service.store.transaction() as conn:
            conn.execute("UPDATE jobs SET creation_time = creation_time - 1801 WHERE name = 'waiter'")
        wait_status(service, "waiter", "FAILED")
        reason = formed(service.describe("waiter").failure_reason)
        assert reason.startswith("CapacityError: no executor slot became free within")
        service.stop("hog")
        wait_status(service, "hog", "STOPPED")


def test_slots_bound_concurrency(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(executor_slots=2)
    service = JobService(settings, start_executor=False)
    use_pipeline(monkeypatch, "complete", TEST_PIPELINE_SECONDS="1.0")
    for index in range(3):
        service.create(make_request(f"par-{index}"))
    peak = 0
    with running_executor(settings) as runner:
        while service.store.active():
            peak = max(peak, len(runner.workers))
            time.sleep(0.02)
    assert peak == 2
    assert [service.get(f"par-{i}").status for i in range(3)] == ["COMPLETED"] * 3


def test_kill_9_of_worker_ends_failed_with_how_it_died(
    service: JobService, executor: Executor, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_pipeline(monkeypatch, "stubborn")
    service.create(make_request("victim"))
    record = wait_status(service, "victim", "INPROGRESS")
    wait_for(lambda: (scratch(settings, "victim") / "partial.bin").exists())
    os.kill(record.worker_pid, signal.SIGKILL)
    wait_status(service, "victim", "FAILED")
    reason = formed(service.describe("victim").failure_reason)
    assert reason.startswith(f"worker process (pid {record.worker_pid}) was killed by signal 9 (SIGKILL)")
    assert "out-of-memory" in reason
    assert not scratch(settings, "victim").exists()


def test_worker_crash_reports_exit_code_and_last_output(
    service: JobService, executor: Executor, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_pipeline(monkeypatch, "crash")
    service.create(make_request("crasher"))
    wait_status(service, "crasher", "FAILED")
    reason = formed(service.describe("crasher").failure_reason)
    assert "exited with code 7 before it recorded a result" in reason
    assert reason.endswith("Last output: fatal: simulated native crash.")


def test_sigterm_without_stop_is_failed_interrupted(
    service: JobService, executor: Executor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DEBUG_DELAY_ENV, "30")
    service.create(make_request("shutdown"))
    wait_for(lambda: service.get("shutdown").last_event)
    os.kill(service.get("shutdown").worker_pid, signal.SIGTERM)
    wait_status(service, "shutdown", "FAILED")
    assert formed(service.describe("shutdown").failure_reason).startswith("interrupted: the worker received SIGTERM")


def test_stop_racing_completion_has_exactly_one_outcome(service: JobService, settings: Settings) -> None:
    """Stop and the worker's final write from two threads, many times: one result, never stuck."""
    for index in range(30):
        name = f"race-{index}"
        service.create(make_request(name))
        # the worker owns the job (its pid is recorded), as after its claim
        service.store.transition(
            name, expect=("STARTING",), to="INPROGRESS", start_time=time.time(), worker_pid=os.getpid()
        )
        worker = Worker(settings, service.store, name, CancelToken())
        worker.log = None
        stop_result: list[str] = []

        def stopper(name: str = name, result: list[str] = stop_result) -> None:
            try:
                service.stop(name)
                result.append("stopped")
            except ValidationException:
                result.append("rejected")

        finishing = threading.Thread(
            target=worker._complete if index % 2 else lambda w=worker: w._fail("boom", category="input"),
            args=(RunOutcome(recommended_image="img"),) if index % 2 else (),
        )
        stopping = threading.Thread(target=stopper)
        finishing.start()
        stopping.start()
        finishing.join()
        stopping.join()
        record = service.get(name)
        assert record.terminal, record.status
        if index % 2:
            assert record.status == "COMPLETED"  # completion wins even over a Stop that got in first
        else:
            # Stop first -> the user's stop wins (STOPPED); failure first -> Stop is rejected.
            assert (record.status, stop_result[0]) in {("STOPPED", "stopped"), ("FAILED", "rejected")}


@pytest.mark.parametrize("how", ["stop", "timeout"])
def test_a_stage_stuck_in_a_call_that_never_returns_still_stops_within_the_deadline(
    how: str, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker ends itself jobs.stop_deadline_seconds after the stop, long before the executor's
    SIGKILL (a 600 s grace here), and the job ends as a stop does."""
    from optjob.limits import limits

    monkeypatch.setenv("OPTJOB_STOP_GRACE_SECONDS", "600")
    use_pipeline(monkeypatch, "deaf")
    settings = load_settings()
    service = JobService(settings, start_executor=False)
    runtime = {"StoppingCondition": {"MaxRuntimeInSeconds": 2}} if how == "timeout" else {}
    deadline = limits().jobs.stop_deadline_seconds
    with running_executor(settings):
        service.create(make_request("stuck", **runtime))
        wait_for(lambda: (service.get("stuck").last_event or {}).get("step") == "native", timeout=30)
        asked = time.monotonic()
        if how == "stop":
            service.stop("stuck")
        record = wait_status(service, "stuck", "STOPPED", "FAILED", timeout=deadline + 30)
        took = time.monotonic() - asked
    assert took < deadline + (12 if how == "timeout" else 8), f"ended {took:.1f} s after the stop"
    assert record.status == ("STOPPED" if how == "stop" else "FAILED")
    if how == "timeout":
        assert record.failure_reason.startswith("MaxRuntimeExceeded:")
    assert "stop overdue" in steps(record, "worker")
    assert "SIGKILL" not in steps(record, "executor")
    assert not scratch(settings, "stuck").exists()
