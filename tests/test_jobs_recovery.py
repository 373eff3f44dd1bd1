"""The control process dies (kill -9) mid-job; a restarted one leaves no job non-terminal.

The control process here is the real daemon (``python -m optjob.jobs.daemon``) in its own process;
the workers are its real children. After SIGKILL of the daemon, workers keep running (their own
session); a new daemon adopts live ones and settles the jobs of dead ones.
"""

# Fixtures are imported from tests.support.jobs, so their parameters shadow the imports.
# ruff: noqa: F811

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from optjob.jobs.daemon import ExecutorLock, ensure_executor, executor_pid, hosted_executor
from optjob.jobs.environment import worker_environment
from optjob.jobs.executor import Executor
from optjob.jobs.local_backend import is_same_process
from optjob.jobs.service import JobService
from optjob.jobs.store import Store
from optjob.pipeline.run import DEBUG_DELAY_ENV
from optjob.settings import Settings
from tests.support.jobs import (  # noqa: F401
    home,
    kill_leftovers,
    make_request,
    service,
    settings,
    use_pipeline,
    wait_for,
    wait_status,
)


@pytest.fixture
def daemons(settings: Settings) -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
    kill_leftovers(settings)


def start_daemon(settings: Settings, started: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "optjob.jobs.daemon", "--idle-exit", "30"],
        env=worker_environment(settings),
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    started.append(proc)
    wait_for(lambda: executor_pid(settings) == proc.pid)
    return proc


def kill9(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


def test_kill_9_of_control_process_then_restart_settles_everything(
    service: JobService, settings: Settings, daemons: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DEBUG_DELAY_ENV, "60")
    monkeypatch.setenv("OPTJOB_EXECUTOR_SLOTS", "3")
    control = start_daemon(settings, daemons)
    for name in ("survivor", "orphan", "stopping"):
        service.create(make_request(name))
        wait_status(service, name, "INPROGRESS")
    service.create(make_request("queued"))  # no free slot: stays STARTING
    kill9(control)

    # The workers outlive their control process. Kill two of them too, as a host crash would;
    # one of those had a Stop recorded while nobody was watching.
    orphan, stopping, survivor = (service.get(name) for name in ("orphan", "stopping", "survivor"))
    os.kill(orphan.worker_pid, signal.SIGKILL)
    service.stop("stopping")
    os.kill(stopping.worker_pid, signal.SIGKILL)
    assert psutil.pid_exists(survivor.worker_pid)
    assert {r.name for r in service.store.active()} == {"survivor", "orphan", "stopping", "queued"}

    start_daemon(settings, daemons)
    orphan = wait_status(service, "orphan", "FAILED")
    assert orphan.failure_reason.startswith(
        f"worker process (pid {orphan.worker_pid}) ended while no executor was watching it"
    )
    wait_status(service, "stopping", "STOPPED")
    # The live worker was adopted: a Stop now reaches it through the new control process.
    wait_for(lambda: "adopted" in Path(survivor.log_path).read_text())
    wait_status(service, "queued", "INPROGRESS")  # the freed slot goes to the queued job
    service.stop("survivor")
    service.stop("queued")
    wait_status(service, "survivor", "STOPPED")
    wait_status(service, "queued", "STOPPED")
    assert service.store.active() == []
    wait_for(lambda: not is_same_process(survivor.worker_pid, survivor.worker_ctime))  # the worker exited


def test_worker_finishing_while_no_control_process_runs(
    service: JobService, settings: Settings, daemons: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_pipeline(monkeypatch, "complete", TEST_PIPELINE_SECONDS="1.5")
    control = start_daemon(settings, daemons)
    service.create(make_request("independent"))
    wait_status(service, "independent", "INPROGRESS")
    kill9(control)
    # Nobody watches it, yet it records its own result.
    wait_status(service, "independent", "COMPLETED")


def test_reused_pid_is_not_mistaken_for_the_worker(service: JobService, settings: Settings) -> None:
    """A recorded pid that now belongs to another process (here: the test itself) is a dead worker."""
    service.create(make_request("ghost"))
    me = psutil.Process(os.getpid())
    service.store.transition(
        "ghost", expect=("STARTING",), to="INPROGRESS", start_time=time.time(),
        worker_pid=os.getpid(), worker_ctime=round(me.create_time(), 2) - 100,
    )  # fmt: skip
    runner = Executor(settings)
    runner.tick()
    record = service.get("ghost")
    assert record.status == "FAILED" and "no executor was watching" in (record.failure_reason or "")
    assert runner.workers == {}


def test_asking_who_holds_the_lock_never_takes_it(settings: Settings) -> None:
    """A probe running while an executor starts must not make that executor think it lost the race."""
    stop = threading.Event()
    probes = 0

    def probe() -> None:
        nonlocal probes
        while not stop.is_set():
            ExecutorLock(settings).holder(settle_s=0)
            probes += 1

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        refused = 0
        for _ in range(300):
            lock = ExecutorLock(settings)
            if lock.acquire():
                assert lock.held()
                lock.release()
            else:
                refused += 1
    finally:
        stop.set()
        prober.join()
    assert probes > 0
    assert refused == 0

    # Nor does a probe rewrite the pid a past holder left in the file.
    (settings.home / "executor.lock").write_text("4242\n")
    assert executor_pid(settings) is None
    assert (settings.home / "executor.lock").read_text() == "4242\n"


def test_one_executor_per_home_and_idle_exit(settings: Settings, daemons: list) -> None:
    first = start_daemon(settings, daemons)
    second = subprocess.Popen(
        [sys.executable, "-m", "optjob.jobs.daemon"], env=worker_environment(settings), stdout=subprocess.DEVNULL
    )
    daemons.append(second)
    assert second.wait(timeout=10) == 0  # the lock is taken: it leaves at once
    assert executor_pid(settings) == first.pid
    assert ensure_executor(settings) is False
    with hosted_executor(settings) as hosted:
        assert hosted is False
    kill9(first)
    assert executor_pid(settings) is None  # the kernel released the dead holder's lock

    # A daemon started on demand exits by itself once idle (OPTJOB_EXECUTOR_IDLE_SECONDS=2).
    assert ensure_executor(settings) is True
    pid = wait_for(lambda: executor_pid(settings))
    wait_for(lambda: executor_pid(settings) is None, timeout=15)
    wait_for(lambda: not is_same_process(pid, None))


def test_create_starts_a_daemon_when_none_runs(
    settings: Settings, daemons: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_pipeline(monkeypatch, "complete")
    service = JobService(settings)  # start_executor defaults to on
    assert ExecutorLock(settings).holder() is None
    service.create(make_request("auto"))
    wait_status(service, "auto", "COMPLETED")
    assert Store(settings.db_path).active() == []
