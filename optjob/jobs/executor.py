"""The local executor: N slots, one OS process per job, real signals, time limits, recovery.

It is a loop over the store (``tick``), not a queue in memory, so whatever process records a
change (the CLI creating or stopping a job, the HTTP server, a worker finishing) the executor
acts on it at its next tick, and a restarted executor picks up exactly where a dead one left:

* queued (STARTING, no worker) jobs start, oldest first, while a slot is free; one that waited
  longer than MaxPendingTimeInSeconds ends FAILED with ``CapacityError: ...``;
* an INPROGRESS job past MaxRuntimeInSeconds (counted from OptimizationStartTime) becomes
  STOPPING with stop_reason ``timeout`` and is then treated exactly like a Stop;
* a STOPPING job's worker gets SIGTERM, then SIGKILL once the grace period has passed;
* a worker that ends without recording a result is settled from its exit status (killed by
  a signal, crashed) and its scratch directory is removed, so partial output never survives;
* a recorded worker this process did not spawn (the previous executor's) is adopted if it is
  still alive (checked by pid *and* start time, so a reused pid is not mistaken for it) and
  settled if it is gone.

Workers run in their own session: Ctrl-C in the terminal of ``optjob run`` or the death of the
executor does not kill them; only the executor's explicit signals do. Exactly one executor runs
per data directory (``optjob.jobs.daemon`` holds the lock); this class itself takes no lock so
tests can drive ``tick`` directly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

import optjob
from optjob.api.principals import AUTH_KEYS_ENV
from optjob.jobs.logs import JobLog
from optjob.jobs.outcomes import capacity_reason, died_reason, end_stopping, fail
from optjob.jobs.store import JobRecord, Store, now_ms
from optjob.jobs.worker import process_ctime
from optjob.pipeline.scratch import discard, sweep
from optjob.settings import Settings
from optjob.storage.credentials import AMBIENT_CREDENTIAL_VARIABLES, ROLES_FILE_PREFIX

DEFAULT_POLL_S = 0.2


@dataclass
class Tracked:
    """A worker process this executor watches; ``popen`` is None for one adopted after a restart."""

    key: str  # the job's job_key
    pid: int
    ctime: float | None
    log_path: str
    popen: subprocess.Popen[bytes] | None = None
    term_sent_at: float | None = None
    kill_sent_at: float | None = None

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return is_same_process(self.pid, self.ctime)

    def returncode(self) -> int | None:
        return self.popen.returncode if self.popen is not None else None

    def signal(self, number: int) -> None:
        try:
            if self.popen is not None:
                self.popen.send_signal(number)
            elif is_same_process(self.pid, self.ctime):
                os.kill(self.pid, number)
        except ProcessLookupError:
            pass


def is_same_process(pid: int, ctime: float | None) -> bool:
    """True if ``pid`` is alive, not a zombie, and (when known) started at ``ctime``."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return ctime is None or abs(round(process.create_time(), 2) - ctime) < 0.05
    except psutil.Error:
        return False


def worker_environment(settings: Settings, job: JobRecord | None = None) -> dict[str, str]:
    """The environment of a process we start: ours, pinned to this data directory, with optjob importable.

    For a job's worker (``job`` given) the server's API keys are left out, and so are optjob's
    own AWS credentials when the job's role keys come from a roles file: a job's process never
    holds what it has no use for. (With STS the worker needs them for sts:AssumeRole alone, and
    drops them once it holds the role's credentials.)
    """
    env = dict(os.environ)
    if job is not None:
        env.pop(AUTH_KEYS_ENV, None)
        if job.role_source.startswith(ROLES_FILE_PREFIX):
            for variable in AMBIENT_CREDENTIAL_VARIABLES:
                env.pop(variable, None)
    env["OPTJOB_HOME"] = str(settings.home)
    root = str(Path(optjob.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


class Executor:
    def __init__(
        self,
        settings: Settings,
        *,
        store: Store | None = None,
        clock: Callable[[], float] = time.time,
        poll_s: float = DEFAULT_POLL_S,
    ) -> None:
        self.settings = settings
        self.store = store or Store(settings.db_path)
        self.clock = clock
        self.poll_s = poll_s
        self.workers: dict[str, Tracked] = {}

    # --- the loop --------------------------------------------------------------------------

    def run(self, stop: threading.Event, *, idle_exit_s: float | None = None) -> None:
        """Tick until ``stop`` is set, or until nothing has been active for ``idle_exit_s``."""
        idle_since: float | None = None
        threading.Thread(target=sweep, args=(self.settings.work_root,), name="optjob-sweep", daemon=True).start()
        while not stop.is_set():
            try:
                busy = self.tick()
            except Exception:  # noqa: BLE001 - a bad tick (e.g. a locked database) must not end the loop
                print(traceback.format_exc(), file=sys.stderr, flush=True)
                busy = True
            if busy:
                idle_since = None
            elif idle_exit_s is not None:
                idle_since = idle_since if idle_since is not None else time.monotonic()
                if time.monotonic() - idle_since >= idle_exit_s:
                    return
            stop.wait(self.poll_s)

    def tick(self) -> bool:
        """One pass over the store; returns whether any job is still active."""
        self._reap()
        jobs = self.store.active()
        queued: list[JobRecord] = []
        for job in jobs:
            tracked = self.workers.get(job.job_key)
            if tracked is None and job.worker_pid is not None:
                tracked = self._adopt(job)
                if tracked is None:
                    continue
            if self._past_runtime(job):
                job = self._time_out(job)
            if job.status == "STOPPING":
                if tracked is not None:
                    self._signal(tracked)
                else:
                    end_stopping(self.store, job.job_key, "stopped before a worker started; nothing ran")
            elif job.status == "STARTING" and tracked is None:
                queued.append(job)
        free = self.settings.executor_slots - len(self.workers)
        for job in queued[: max(free, 0)]:
            self._spawn(job)
        for job in queued[max(free, 0) :]:
            self._check_pending(job)
        return bool(jobs) or bool(self.workers)

    # --- starting ----------------------------------------------------------------------------

    def _spawn(self, job: JobRecord) -> None:
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
            where_pid=(None, popen.pid),
        )
        if not recorded:  # another worker owns the job, or it ended meanwhile: ours must not run
            popen.kill()
            popen.wait()
            return
        self.workers[job.job_key] = Tracked(job.job_key, popen.pid, ctime, job.log_path, popen=popen)
        JobLog(job.log_path).write("executor", "spawned", f"worker pid {popen.pid}")

    def _check_pending(self, job: JobRecord) -> None:
        if job.max_pending_s is None or self.clock() - job.creation_time < job.max_pending_s:
            return
        fail(
            self.store,
            job.job_key,
            capacity_reason(job.max_pending_s, self.settings.executor_slots),
            expect=("STARTING",),
            category="capacity",
        )

    # --- stopping ----------------------------------------------------------------------------

    def _past_runtime(self, job: JobRecord) -> bool:
        return (
            job.status == "INPROGRESS"
            and job.max_runtime_s is not None
            and job.start_time is not None
            and self.clock() - job.start_time >= job.max_runtime_s
        )

    def _time_out(self, job: JobRecord) -> JobRecord:
        now = now_ms(self.clock())
        if self.store.transition(
            job.job_key, expect=("INPROGRESS",), to="STOPPING", now=now, stop_reason="timeout", stop_requested_at=now
        ):
            JobLog(job.log_path).write(
                "lifecycle",
                "STOPPING",
                f"MaxRuntimeInSeconds ({job.max_runtime_s:g} s) reached; stopping",
                level="warning",
            )
        return self.store.get(job.job_key) or job

    def _signal(self, tracked: Tracked) -> None:
        now = time.monotonic()
        log = JobLog(tracked.log_path)
        grace = self.settings.stop_grace_s
        if tracked.term_sent_at is None:
            tracked.term_sent_at = now
            tracked.signal(signal.SIGTERM)
            log.write("executor", "SIGTERM", f"sent SIGTERM to worker pid {tracked.pid}; {grace:g} s grace")
        elif tracked.kill_sent_at is None and now - tracked.term_sent_at >= grace:
            tracked.kill_sent_at = now
            tracked.signal(signal.SIGKILL)
            log.write(
                "executor",
                "SIGKILL",
                f"worker pid {tracked.pid} still running after {grace:g} s; sent SIGKILL",
                level="warning",
            )

    # --- ending ------------------------------------------------------------------------------

    def _reap(self) -> None:
        for key, tracked in list(self.workers.items()):
            if not tracked.alive():
                del self.workers[key]
                self._settle(tracked, tracked.returncode())

    def _adopt(self, job: JobRecord) -> Tracked | None:
        """A worker recorded by a previous executor: watch it if alive, settle its job if not."""
        assert job.worker_pid is not None
        tracked = Tracked(job.job_key, job.worker_pid, job.worker_ctime, job.log_path)
        if tracked.alive():
            self.workers[job.job_key] = tracked
            JobLog(job.log_path).write("executor", "adopted", f"watching worker pid {job.worker_pid} again")
            return tracked
        self._settle(tracked, None)
        return None

    def _settle(self, tracked: Tracked, returncode: int | None) -> None:
        """The worker is gone: remove its scratch space and end the job if it did not."""
        record = self.store.get(tracked.key)
        if record is not None and record.worker_pid not in (None, tracked.pid):
            return  # not ours (another worker owns the job now)
        discard(self.settings.work_root / tracked.key)  # a dead worker's scratch; deleted in the background
        log = JobLog(tracked.log_path)
        if returncode is not None:
            log.write("executor", "exited", f"worker pid {tracked.pid} exited with status {returncode}")
        if record is None or record.terminal:
            return
        if record.status == "STOPPING":
            if tracked.kill_sent_at is not None:
                note = f"worker did not exit within the {self.settings.stop_grace_s:g} s grace period; killed"
            else:
                note = "worker ended; partial output discarded"
            end_stopping(self.store, tracked.key, note)
        else:
            last = _last_line(Path(tracked.log_path).with_suffix(".out"))
            fail(
                self.store,
                tracked.key,
                died_reason(returncode, tracked.pid, last_output=last),
                category="infrastructure",
            )


def _last_line(path: Path, limit: int = 300) -> str:
    """The last non-empty line a worker printed (a crash's last words), clipped."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - 4096))
            lines = [line.strip() for line in handle.read().decode(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [line for line in lines if line]
    return lines[-1][:limit] if lines else ""
