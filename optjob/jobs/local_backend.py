"""The local backend: one OS process per job on this host, real signals, adoption by pid and start time.

Workers run in their own session: Ctrl-C in the terminal of ``optjob run`` or the death of the
executor does not kill them; only the executor's explicit signals do. A worker recorded by a
previous executor is adopted if it is still alive, checked by pid *and* start time, so a reused
pid is not mistaken for it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

from optjob.jobs.environment import worker_environment
from optjob.jobs.logs import JobLog
from optjob.jobs.outcomes import capacity_reason
from optjob.jobs.store import JobRecord, Store
from optjob.jobs.worker import process_ctime
from optjob.settings import Settings


def is_same_process(pid: int, ctime: float | None) -> bool:
    """True if ``pid`` is alive, not a zombie, and (when known) started at ``ctime``."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return ctime is None or abs(round(process.create_time(), 2) - ctime) < 0.05
    except psutil.Error:
        return False


@dataclass
class ProcessHandle:
    """A worker process; ``popen`` is None for one adopted after a restart."""

    key: str  # the job's job_key
    pid: int
    ctime: float | None
    log_path: str
    popen: subprocess.Popen[bytes] | None = None
    term_sent_at: float | None = None
    kill_sent_at: float | None = None

    @property
    def label(self) -> str:
        return f"worker pid {self.pid}"

    @property
    def who(self) -> str:
        return f"pid {self.pid}"

    def owns(self, record: JobRecord) -> bool:
        return record.worker_pid in (None, self.pid)

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return is_same_process(self.pid, self.ctime)

    def returncode(self) -> int | None:
        return self.popen.returncode if self.popen is not None else None

    def lost(self) -> str | None:
        return None  # this host is the executor's own: when it dies, so does the executor

    def waiting(self) -> bool:
        return False  # a process starts at once

    def terminate(self) -> None:
        self._send(signal.SIGTERM)

    def kill(self) -> None:
        self._send(signal.SIGKILL)

    def _send(self, number: int) -> None:
        try:
            if self.popen is not None:
                self.popen.send_signal(number)
            elif is_same_process(self.pid, self.ctime):
                os.kill(self.pid, number)
        except ProcessLookupError:
            pass


class LocalBackend:
    """``OPTJOB_EXECUTOR_SLOTS`` worker processes at once, on this host."""

    name = "local"
    max_attempts = 1

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store

    @property
    def slots(self) -> int | None:
        return self.settings.executor_slots

    def recorded(self, job: JobRecord) -> bool:
        return job.worker_pid is not None

    def infeasible(self, job: JobRecord) -> str | None:
        return None  # a host that cannot run a stage is refused by the worker, with the stage's reason

    def pending_reason(self, job: JobRecord) -> str:
        return capacity_reason(job.max_pending_s, self.settings.executor_slots)

    def launch(self, job: JobRecord) -> ProcessHandle | None:
        out_path = Path(job.log_path).with_suffix(".out")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with open(out_path, "ab") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", "optjob.jobs.worker", job.job_key],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=worker_environment(self.settings, job),
                start_new_session=True,  # Ctrl-C and our own death must not reach the worker
            )
        ctime = process_ctime(popen.pid)
        recorded = self.store.transition(
            job.job_key,
            expect=("STARTING", "STOPPING"),
            worker_pid=popen.pid,
            worker_ctime=ctime,
            attempts=job.attempts + 1,
            where_pid=(None, popen.pid),
        )
        if not recorded:  # another worker owns the job, or it ended meanwhile: ours must not run
            popen.kill()
            popen.wait()
            return None
        JobLog(job.log_path).write("executor", "spawned", f"worker pid {popen.pid}")
        return ProcessHandle(job.job_key, popen.pid, ctime, job.log_path, popen=popen)

    def adopt(self, job: JobRecord) -> ProcessHandle:
        assert job.worker_pid is not None
        return ProcessHandle(job.job_key, job.worker_pid, job.worker_ctime, job.log_path)

    def sweep(self) -> list[str]:
        return []  # an exited process holds nothing

    def release(self, handle: ProcessHandle) -> None:
        """Nothing to free: a process that exited holds nothing."""
