"""The executor: the job lifecycle as a loop over the store, with whatever runs workers behind one interface.

It is a loop over the store (``tick``), not a queue in memory, so whatever process records a
change (the CLI creating or stopping a job, the HTTP server, a worker finishing) the executor
acts on it at its next tick, and a restarted executor picks up exactly where a dead one left:

* queued (STARTING, no worker) jobs start, oldest first, while the backend has room; a job that no
  worker could ever run fails at once, and one that waited longer than MaxPendingTimeInSeconds
  (queued here, or placed but not yet started by the backend) ends FAILED with ``CapacityError: ...``;
* an INPROGRESS job past MaxRuntimeInSeconds (counted from OptimizationStartTime) becomes
  STOPPING with stop_reason ``timeout`` and is then treated exactly like a Stop;
* a STOPPING job's worker is asked to stop (SIGTERM), then killed once the grace period has passed;
* a worker that ends without recording a result is settled from its exit status (killed by
  a signal, crashed) and its scratch directory is removed, so partial output never survives;
  one whose *node* was lost is started again on another node while attempts remain, and the new
  attempt resumes from the job's recorded progress;
* a worker recorded by a previous executor is adopted if it is still running and settled if not.

Two backends sit behind ``Backend``: ``local_backend`` (OS processes on this host) and
``ray_backend`` (one Ray actor per job on a cluster). Exactly one executor runs per data directory
(``optjob.jobs.daemon`` holds the lock); this class itself takes no lock so tests can drive
``tick`` directly.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from optjob.jobs.local_backend import LocalBackend
from optjob.jobs.logs import JobLog
from optjob.jobs.outcomes import died_reason, end_stopping, fail, node_lost_reason
from optjob.jobs.store import JobRecord, Store, now_ms
from optjob.jobs.worker import attempt_work_dir
from optjob.pipeline.scratch import discard, sweep
from optjob.settings import Settings

DEFAULT_POLL_S = 0.2
SWEEP_INTERVAL_S = 30.0


class WorkerHandle(Protocol):
    """One running attempt of one job, as the executor sees it, whatever runs it."""

    key: str
    log_path: str
    term_sent_at: float | None
    kill_sent_at: float | None

    @property
    def label(self) -> str: ...  # "worker pid 17", "Ray actor optjob-job.x.1 (worker pid 17 on node 127.0.0.2)"

    @property
    def who(self) -> str: ...  # for a FailureReason: "pid 17", "pid 17 on Ray node 127.0.0.2"

    def owns(self, record: JobRecord) -> bool: ...  # the store still names this attempt (or none)

    def alive(self) -> bool: ...

    def returncode(self) -> int | None: ...

    def lost(self) -> str | None: ...  # why the node under it is gone (the attempt may be retried)

    def waiting(self) -> bool: ...  # placed but not started yet (no node had room)

    def terminate(self) -> None: ...  # the graceful stop: the worker's SIGTERM path

    def kill(self) -> None: ...


class Backend(Protocol):
    name: str
    max_attempts: int

    @property
    def slots(self) -> int | None: ...  # jobs at once, or None when the backend queues itself

    def recorded(self, job: JobRecord) -> bool: ...  # the store names a worker of this backend

    def infeasible(self, job: JobRecord) -> str | None: ...  # why no worker could ever run it

    def pending_reason(self, job: JobRecord) -> str: ...  # the CapacityError after MaxPendingTime

    def launch(self, job: JobRecord) -> WorkerHandle | None: ...  # None: the job is no longer ours

    def adopt(self, job: JobRecord) -> WorkerHandle | None: ...  # None: the recorded worker is gone

    def release(self, handle: WorkerHandle) -> None: ...  # free what an ended attempt still holds

    def sweep(self) -> list[str]: ...  # free what attempts no job names any more still hold


def backend_for(settings: Settings, store: Store) -> Backend:
    """The backend ``settings.executor`` names; Ray is imported only when asked for."""
    if settings.executor == "ray":
        from optjob.jobs.ray_backend import RayBackend

        return RayBackend(settings, store)
    return LocalBackend(settings, store)


class Executor:
    def __init__(
        self,
        settings: Settings,
        *,
        store: Store | None = None,
        backend: Backend | None = None,
        clock: Callable[[], float] = time.time,
        poll_s: float = DEFAULT_POLL_S,
    ) -> None:
        self.settings = settings
        self.store = store or Store(settings.db_path)
        self.backend = backend or backend_for(settings, self.store)
        self.clock = clock
        self.poll_s = poll_s
        self.workers: dict[str, WorkerHandle] = {}
        self.cleanups: list[threading.Thread] = []  # output clean-ups of stopped jobs (daemon threads)
        self._swept_at: float | None = None

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
                    break
            stop.wait(self.poll_s)
        for cleanup in self.cleanups:  # an exiting executor still finishes what it promised
            cleanup.join(timeout=60)

    def tick(self) -> bool:
        """One pass over the store; returns whether any job is still active."""
        self._reap()
        jobs = self.store.active()
        if self._swept_at is None or time.monotonic() - self._swept_at >= SWEEP_INTERVAL_S:
            self._swept_at = time.monotonic()
            for name in self.backend.sweep():
                print(f"optjob executor: freed {name}, an attempt of a job that has ended", file=sys.stderr, flush=True)
        queued: list[JobRecord] = []
        for job in jobs:
            tracked = self.workers.get(job.job_key)
            if tracked is None and self.backend.recorded(job):
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
            elif tracked is None and job.worker_pid is None:
                queued.append(job)  # never started, or an attempt whose node was lost
            elif tracked is not None and job.status == "STARTING" and tracked.waiting():
                self._check_pending(job, tracked)
        slots = self.backend.slots
        free = len(queued) if slots is None else max(slots - len(self.workers), 0)
        for job in queued[:free]:
            self._start(job)
        for job in queued[free:]:
            self._check_pending(job, None)
        return bool(jobs) or bool(self.workers)

    # --- starting ----------------------------------------------------------------------------

    def _start(self, job: JobRecord) -> None:
        reason = self.backend.infeasible(job)
        if reason is not None:
            fail(self.store, job.job_key, f"CapacityError: {reason}", expect=(job.status,), category="capacity")
            return
        handle = self.backend.launch(job)
        if handle is not None:
            self.workers[job.job_key] = handle

    def _check_pending(self, job: JobRecord, tracked: WorkerHandle | None) -> None:
        if job.max_pending_s is None or self.clock() - job.creation_time < job.max_pending_s:
            return
        if tracked is not None:  # placed but never started: take it back before failing the job
            tracked.kill()
            self.backend.release(tracked)
            del self.workers[job.job_key]
        fail(self.store, job.job_key, self.backend.pending_reason(job), expect=("STARTING",), category="capacity")

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

    def _signal(self, tracked: WorkerHandle) -> None:
        now = time.monotonic()
        log = JobLog(tracked.log_path)
        grace = self.settings.stop_grace_s
        if tracked.term_sent_at is None:
            tracked.term_sent_at = now
            tracked.terminate()
            log.write("executor", "SIGTERM", f"sent SIGTERM to {tracked.label}; {grace:g} s grace")
        elif tracked.kill_sent_at is None and now - tracked.term_sent_at >= grace:
            tracked.kill_sent_at = now
            tracked.kill()
            log.write(
                "executor",
                "SIGKILL",
                f"{tracked.label} still running after {grace:g} s; sent SIGKILL",
                level="warning",
            )

    # --- ending ------------------------------------------------------------------------------

    def _reap(self) -> None:
        for key, tracked in list(self.workers.items()):
            if not tracked.alive():
                del self.workers[key]
                self._settle(tracked, tracked.returncode())

    def _adopt(self, job: JobRecord) -> WorkerHandle | None:
        """A worker recorded by a previous executor: watch it if alive, settle its job if not."""
        tracked = self.backend.adopt(job)
        if tracked is not None and tracked.alive():
            self.workers[job.job_key] = tracked
            JobLog(job.log_path).write("executor", "adopted", f"watching {tracked.label} again")
            return tracked
        if tracked is not None:
            self._settle(tracked, tracked.returncode())
        else:
            self._settle_unknown(job)
        return None

    def _settle(self, tracked: WorkerHandle, returncode: int | None) -> None:
        """The worker is gone: remove its scratch space, retry a lost node's attempt, end the job if it did not."""
        self.backend.release(tracked)
        record = self.store.get(tracked.key)
        if record is not None and not tracked.owns(record):
            return  # not ours (another worker owns the job now)
        lost = tracked.lost()
        retrying = lost is not None and record is not None and record.status in ("STARTING", "INPROGRESS")
        retrying = retrying and record.attempts < self.backend.max_attempts
        if not retrying:  # a retried attempt's straggler may still be writing its own scratch: leave it
            self._discard_scratch(tracked.key, record.attempts if record else 1)
        log = JobLog(tracked.log_path)
        if returncode is not None:
            log.write("executor", "exited", f"{tracked.label} exited with status {returncode}")
        elif lost:
            log.write("executor", "node lost", f"{tracked.label}: {lost}", level="warning")
        if record is None or record.terminal:
            return
        if record.status == "STOPPING":
            if tracked.kill_sent_at is not None:
                note = f"worker did not exit within the {self.settings.stop_grace_s:g} s grace period; killed"
            else:
                note = "worker ended; partial output discarded"
            end_stopping(self.store, tracked.key, note)
            self._discard_output(record)
        elif retrying and lost:
            self._retry(record, lost)
        elif lost:
            fail(
                self.store,
                tracked.key,
                node_lost_reason(lost, record.attempts, self.backend.max_attempts),
                category="infrastructure",
            )
        else:
            last = _last_line(Path(tracked.log_path).with_suffix(".out"))
            reason = died_reason(returncode, tracked.who, last_output=last)
            fail(self.store, tracked.key, reason, category="infrastructure")

    def _settle_unknown(self, job: JobRecord) -> None:
        """The store names a worker the backend no longer knows at all: it ended while nobody watched."""
        self._discard_scratch(job.job_key, job.attempts)
        if job.status == "STOPPING":
            end_stopping(self.store, job.job_key, "worker ended while no executor watched; partial output discarded")
            self._discard_output(job)
        else:
            fail(self.store, job.job_key, died_reason(None, job.executor_ref or "unknown"), category="infrastructure")

    def _discard_output(self, record: JobRecord) -> None:
        """A stopped or timed-out job's output prefix, as its reason promises: a worker killed before
        its rollback leaves its claim and partial objects there (``publish.discard_abandoned``, a
        no-op when the worker cleaned up itself). On a thread, with the job's own credentials, so a
        slow S3 never holds up the loop."""
        thread = threading.Thread(target=_discard_output, args=(record,), name=f"discard-{record.name}", daemon=True)
        thread.start()
        self.cleanups.append(thread)

    def _discard_scratch(self, key: str, attempts: int) -> None:
        """Every attempt's scratch directory; deleted in the background."""
        for attempt in range(1, max(attempts, 1) + 1):
            discard(attempt_work_dir(self.settings, key, attempt))

    def _retry(self, record: JobRecord, lost: str) -> None:
        """Hand the job back to the queue for another node; its progress lets the next attempt resume."""
        if self.store.transition(
            record.job_key,
            expect=(record.status,),
            worker_pid=None,
            worker_ctime=None,
            executor_ref=None,
            where_pid=(record.worker_pid,),
        ):
            JobLog(record.log_path).write(
                "executor",
                "retrying",
                f"attempt {record.attempts} of {self.backend.max_attempts} lost its node ({lost}); "
                "starting another attempt, which resumes from the recorded progress",
                level="warning",
            )


def _discard_output(record: JobRecord) -> None:
    from optjob.pipeline.plan import Plan
    from optjob.storage.credentials import job_credentials
    from optjob.storage.publish import discard_abandoned
    from optjob.storage.s3 import S3Settings

    log = JobLog(record.log_path)
    try:
        output = Plan.model_validate_json(record.plan_json).output.s3_uri
        role_arn = json.loads(record.request_json).get("RoleArn", "")
        credentials = job_credentials(record.role_source, role_arn, session_name=record.name)
        removed = discard_abandoned(output, record.arn, settings=S3Settings(credentials=credentials))
    except Exception as exc:  # best effort: the missing manifest still marks the prefix incomplete
        log.write("output", "cleanup", f"could not remove the partial output ({type(exc).__name__}: {exc})",
                  level="warning")  # fmt: skip
        return
    if removed:
        log.write("output", "cleanup", f"removed {removed} objects the stopped worker left at {output}")


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
