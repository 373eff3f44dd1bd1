"""``python -m optjob.jobs.worker JOB_KEY``: one job, in its own OS process, start to terminal status.

The executor spawns this; it may also outlive the executor (it runs in its own session), so it
records its own result in the store and needs nobody watching to finish correctly. It claims
the job with a compare-and-set (STARTING -> INPROGRESS with its pid), so two workers for one job
cannot both run it, and every final write is a compare-and-set too: if a Stop races the end of
the work, exactly one outcome lands.

SIGTERM (Stop or MaxRuntimeInSeconds, sent by the executor) sets the pipeline's CancelToken; the
pipeline raises JobCancelled at its next check and removes its scratch directory. The executor
sends SIGKILL if that takes longer than the grace period.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from optjob.errors import JobCancelled, JobFailed, VerificationFailed
from optjob.jobs.logs import JobLog
from optjob.jobs.outcomes import clip_reason, end_stopping, fail, internal_error_reason, interrupted_reason
from optjob.jobs.store import JobRecord, Store, now_ms
from optjob.limits import limits
from optjob.pipeline.outcome import RunOutcome
from optjob.pipeline.plan import Plan
from optjob.runtime.allocator import tune_allocator
from optjob.runtime.cancel import CancelToken
from optjob.runtime.events import Event, EventSink
from optjob.settings import Settings, load_settings
from optjob.storage.credentials import AMBIENT_CREDENTIAL_VARIABLES, job_credentials
from optjob.storage.s3 import S3Settings

# "module:function" with run_plan's signature. The default is the real pipeline; the seam lets
# tests drive a real worker process to COMPLETED before every pipeline stage exists, and lets
# an operator wrap the pipeline (e.g. with a sandbox) without forking optjob.
PIPELINE_ENV = "OPTJOB_PIPELINE"
DEFAULT_PIPELINE = "optjob.pipeline.run:run_plan"

EXIT_COMPLETED, EXIT_INPUT, EXIT_INFRASTRUCTURE, EXIT_INTERNAL, EXIT_STOPPED, EXIT_NOT_OURS = 0, 1, 2, 3, 4, 5
_EVENT_STORE_INTERVAL_S = 1.0
OWNERSHIP_CHECK_S = 0.5


def attempt_work_dir(settings: Settings, key: str, attempt: int) -> Path:
    """Each attempt's own scratch: a retried attempt never shares files with a straggler of the last one."""
    return settings.work_root / (key if attempt <= 1 else f"{key}.attempt-{attempt}")


def process_ctime(pid: int) -> float | None:
    """A process's start time, which with the pid identifies it even after the pid is reused."""
    try:
        return round(psutil.Process(pid).create_time(), 2)
    except psutil.Error:
        return None


def job_storage(settings: Settings, record: JobRecord) -> S3Settings:
    """S3 settings with the job's role credentials, and a model cache of that role's own.

    Once the role's credentials are in hand, optjob's own are removed from this process's
    environment, so nothing the job starts (a compiler, a side environment) inherits them. Each
    role gets its own cache directory: a model downloaded with one role's rights is never served
    to a job whose role could not have read it.
    """
    request = json.loads(record.request_json)
    role_arn = request.get("RoleArn", "")
    credentials = job_credentials(record.role_source, role_arn, session_name=record.name)
    cache_dir = settings.cache_dir
    if credentials is not None:
        for variable in AMBIENT_CREDENTIAL_VARIABLES:
            os.environ.pop(variable, None)
        cache_dir = cache_dir / "roles" / hashlib.sha256(role_arn.encode()).hexdigest()[:16]
    return S3Settings(cache_dir=cache_dir, credentials=credentials)


def load_pipeline() -> Callable[..., RunOutcome]:
    module_name, _, attr = (os.environ.get(PIPELINE_ENV) or DEFAULT_PIPELINE).partition(":")
    return getattr(importlib.import_module(module_name), attr)


class Worker:
    def __init__(self, settings: Settings, store: Store, key: str, cancel: CancelToken) -> None:
        """``key``: the job's ``job_key`` in the store (its name, for the home account and region)."""
        self.settings = settings
        self.store = store
        self.key = key
        self.cancel = cancel
        self.pid = os.getpid()
        self.log: JobLog | None = None
        self._last_stored: tuple[float, str, str] = (0.0, "", "")

    def run(self) -> int:
        record = self.store.get(self.key)
        if record is None:
            return EXIT_NOT_OURS  # deleted before it started
        self.log = JobLog(record.log_path)
        if not self._claim():
            return self._not_claimed()
        self.log.write("lifecycle", "INPROGRESS", f"worker pid {self.pid} started")
        threading.Thread(target=self._watch_ownership, name="optjob-ownership", daemon=True).start()
        try:
            pipeline = load_pipeline()
            plan = Plan.model_validate_json(record.plan_json)
            storage = job_storage(self.settings, record)
            farm = self._helpers(record, plan, storage)
            outcome = pipeline(
                plan,
                work_dir=attempt_work_dir(self.settings, self.key, max(record.attempts, 1)),
                job_arn=record.arn,
                events=EventSink(self._on_event),
                cancel=self.cancel,
                storage=storage,
                **({"farm": farm} if farm is not None else {}),
            )
        except JobCancelled:
            return self._cancelled()
        except JobFailed as exc:
            kind = "verification" if isinstance(exc, VerificationFailed) else exc.category
            self._fail(str(exc), category=exc.category, outcome={"failure_kind": kind})
            return EXIT_INPUT if exc.category == "input" else EXIT_INFRASTRUCTURE
        except Exception as exc:  # noqa: BLE001 - any bug must still end the job FAILED, with a reason
            self.log.write(
                "worker", "error", f"{type(exc).__name__}: {exc}", level="error", traceback=traceback.format_exc()
            )
            self._fail(internal_error_reason(exc, job=record.name), category="internal",
                       outcome={"failure_kind": "internal"})  # fmt: skip
            return EXIT_INTERNAL
        return self._complete(outcome)

    # --- claiming ------------------------------------------------------------------------

    def _claim(self) -> bool:
        """STARTING -> INPROGRESS with our pid; or, for a retried attempt (its node was lost), an
        INPROGRESS job that no worker owns, keeping the first attempt's start time (MaxRuntime counts
        from it)."""
        me = {"worker_pid": self.pid, "worker_ctime": process_ctime(self.pid)}
        if self.store.transition(
            self.key, expect=("STARTING",), to="INPROGRESS", start_time=now_ms(), where_pid=(None, self.pid), **me
        ):
            return True
        return self.store.transition(self.key, expect=("INPROGRESS",), where_pid=(None,), **me)

    def _helpers(self, record: JobRecord, plan: Plan, storage: S3Settings) -> Any:
        """Helper workers for MaxInstanceCount > 1, where they pay: a tensor-streaming job on Ray."""
        instances = record.max_instance_count or 1
        if instances <= 1:
            return None
        from optjob.pipeline.stage import TensorStreamingTechnique
        from optjob.pipeline.streaming import streaming_technique

        if self.settings.executor != "ray" or not isinstance(streaming_technique(plan), TensorStreamingTechnique):
            where = "this job's stages need the whole model" if self.settings.executor == "ray" else "no Ray cluster"
            self._write("worker", "instances", f"MaxInstanceCount {instances}: one worker runs the job ({where})")
            return None
        from optjob.jobs.ray_farm import RayShardFarm

        farm = RayShardFarm(self.settings, plan, job_arn=record.arn, storage=storage, instances=instances)
        self._write("worker", "instances", f"MaxInstanceCount {instances}: this worker and up to {farm.slots} "
                    "helper(s) on the Ray cluster make the output shards")  # fmt: skip
        return farm

    def _watch_ownership(self) -> None:
        """Leave at once, touching nothing, when the job is no longer ours.

        An executor that lost contact with this attempt's node hands the job to a new attempt by
        clearing ``worker_pid``. If this attempt is in fact still running (its node was cut off,
        not dead), it must not go on writing the output or record an outcome: the new attempt owns
        both. Exiting without cleanup is deliberate; a rollback here would delete the new attempt's
        progress.
        """
        while True:
            time.sleep(OWNERSHIP_CHECK_S)
            try:
                record = self.store.get(self.key)
            except Exception:  # noqa: BLE001 - a busy database is not a lost job
                continue
            if record is not None and self._stop_overdue(record):
                os._exit(EXIT_STOPPED)
            if record is not None and record.worker_pid != self.pid:
                self._write(
                    "worker",
                    "disowned",
                    f"worker pid {self.pid}: another attempt owns the job now; leaving without touching it",
                    level="warning",
                )
                os._exit(EXIT_NOT_OURS)

    def _stop_overdue(self, record: JobRecord) -> bool:
        """Whether a stop recorded ``stop_deadline_seconds`` ago has still not ended this process.

        Checked on this thread, from the store, so it holds even while the main thread sits in a library
        call that never returns and never lets the SIGTERM handler's cancellation be seen. Leaving
        without cleanup is safe: the executor settles a worker that ended while STOPPING (STOPPED, or
        FAILED for a timeout) and removes what it had uploaded."""
        if record.status != "STOPPING" or record.stop_requested_at is None or record.worker_pid != self.pid:
            return False
        deadline = limits().jobs.stop_deadline_seconds
        late = time.time() - record.stop_requested_at
        if late < deadline:
            return False
        self._write(
            "worker",
            "stop overdue",
            f"worker pid {self.pid}: still running {late:.0f} s after the stop was requested (a call that does not "
            f"return; jobs.stop_deadline_seconds is {deadline:g}); ending the process, the executor discards the "
            "partial output",
            level="warning",
        )
        return True

    def _not_claimed(self) -> int:
        record = self.store.get(self.key)
        if record is not None and record.status == "STOPPING" and record.worker_pid in (None, self.pid):
            return self._cancelled()  # stopped before it started: nothing ran, nothing to clean
        return EXIT_NOT_OURS  # another worker owns it, or it already ended

    # --- outcomes ------------------------------------------------------------------------

    def _complete(self, outcome: RunOutcome) -> int:
        # A Stop that arrives after the work was published loses: the output exists, so say so.
        done = self.store.transition(
            self.key,
            expect=("INPROGRESS", "STOPPING"),
            to="COMPLETED",
            output_image=outcome.recommended_image,
            outcome_json=json.dumps(outcome.summary(), default=str),
            where_pid=(self.pid,),
        )
        if done:
            self._write("lifecycle", "COMPLETED", "published " + ", ".join(outcome.published or ["(nothing)"]))
            for warning in outcome.warnings:
                self._write("worker", "warning", warning, level="warning")
        return EXIT_COMPLETED

    def _cancelled(self) -> int:
        record = self.store.get(self.key)
        if record is not None and record.status == "INPROGRESS":
            self._fail(interrupted_reason(), category="infrastructure")  # SIGTERM, but no Stop
        else:
            end_stopping(self.store, self.key, "stopped cleanly; partial output discarded")
        return EXIT_STOPPED

    def _fail(self, reason: str, *, category: str, outcome: dict[str, Any] | None = None) -> None:
        """INPROGRESS -> FAILED; if a Stop or timeout got there first, that stop's outcome wins."""
        if not fail(self.store, self.key, reason, expect=("INPROGRESS",), category=category,
                    where_pid=(self.pid,), outcome=outcome):  # fmt: skip
            end_stopping(self.store, self.key, f"ended while failing: {clip_reason(reason, job=self.key)}")

    # --- plumbing ------------------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        self._write_event(event)
        now = time.monotonic()
        last_at, last_stage, last_step = self._last_stored
        if now - last_at >= _EVENT_STORE_INTERVAL_S or (event.stage, event.step) != (last_stage, last_step):
            self.store.record_event(self.key, event.as_dict())
            self._last_stored = (now, event.stage, event.step)

    def _write_event(self, event: Event) -> None:
        if self.log is not None:
            self.log.event(event)

    def _write(self, stage: str, step: str, message: str, **fields: Any) -> None:
        if self.log is not None:
            self.log.write(stage, step, message, **fields)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m optjob.jobs.worker JOB_KEY", file=sys.stderr)
        return 64
    tune_allocator()
    settings = load_settings()
    cancel = CancelToken()
    signal.signal(signal.SIGTERM, lambda *_: cancel.cancel("stopped"))
    return Worker(settings, Store(settings.db_path), args[0], cancel).run()


if __name__ == "__main__":
    sys.exit(main())
