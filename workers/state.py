"""The job's lifecycle as the worker records it: in memory alone, or in the control plane's store too.

Both holders render DescribeOptimizationJob through ``optjob.jobs.service.describe_record`` from a
``JobRecord``, so the status object a scheduler user reads from S3 is built by the very code the
API uses, and the end-of-job rules (a Stop ends STOPPED, a MaxRuntimeInSeconds stop ends FAILED
with ``MaxRuntimeExceeded:``) are the ones in ``optjob.jobs.outcomes``.

``LocalState`` keeps the record in memory: no database, no service, the default in a container.
``ControlPlaneState`` (``--control-plane``) creates or adopts the job in the store of
``OPTJOB_HOME`` through ``JobService`` and moves it with the store's compare-and-set transitions,
so ``optjob describe``/``list``/the HTTP API show the job, and a StopOptimizationJob recorded
there reaches the worker (it polls ``stop_requested``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Protocol

from optjob.api.errors import ResourceInUse
from optjob.api.shapes import CreateOptimizationJobRequest, DescribeOptimizationJobResponse
from optjob.jobs.logs import JobLog
from optjob.jobs.outcomes import clip_reason, end_stopping, fail, timeout_reason
from optjob.jobs.service import JobService, describe_record
from optjob.jobs.store import JobRecord, Store, now_ms, starting_record
from optjob.jobs.tenancy import home_caller
from optjob.jobs.worker import process_ctime
from optjob.pipeline.plan import Plan
from optjob.settings import Settings


class JobState(Protocol):
    name: str
    arn: str

    def describe(self) -> DescribeOptimizationJobResponse: ...
    def start(self) -> bool: ...
    def complete(self, image: str | None) -> bool: ...
    def fail(self, reason: str, category: str) -> None: ...
    def stopping(self, why: str) -> None: ...
    def stopped(self, note: str) -> None: ...
    def record_event(self, data: dict[str, Any]) -> None: ...
    def stop_requested(self) -> str | None: ...


class LocalState:
    """The record in memory; each method mirrors the store transition the control plane would make."""

    def __init__(self, request: CreateOptimizationJobRequest, plan: Plan | None, arn: str) -> None:
        self.record = starting_record(
            request,
            plan,
            arn,
            now=now_ms(),
            log_path="",
            worker_pid=os.getpid(),
            worker_ctime=process_ctime(os.getpid()),
        )
        self.name = self.record.name
        self.arn = arn

    def _move(self, expect: tuple[str, ...], to: str, **changes: Any) -> bool:
        if self.record.status not in expect:
            return False
        moment = now_ms()
        changes.update(status=to, last_modified_time=moment)
        if to in ("COMPLETED", "FAILED", "STOPPED"):
            changes.setdefault("end_time", moment)
        self.record = dataclasses.replace(self.record, **changes)
        return True

    def describe(self) -> DescribeOptimizationJobResponse:
        return describe_record(self.record)

    def start(self) -> bool:
        return self._move(("STARTING",), "INPROGRESS", start_time=now_ms())

    def complete(self, image: str | None) -> bool:
        return self._move(("INPROGRESS", "STOPPING"), "COMPLETED", output_image=image)

    def fail(self, reason: str, category: str) -> None:
        if not self._move(("STARTING", "INPROGRESS"), "FAILED", failure_reason=clip_reason(reason)):
            self.stopped(f"ended while failing: {clip_reason(reason)}")

    def stopping(self, why: str) -> None:
        self._move(("STARTING", "INPROGRESS"), "STOPPING", stop_reason=why, stop_requested_at=now_ms())

    def stopped(self, note: str) -> None:
        if self.record.stop_reason == "timeout":
            self._move(("STOPPING",), "FAILED", failure_reason=timeout_reason(self.record.max_runtime_s))
        else:
            self._move(("STOPPING",), "STOPPED")

    def record_event(self, data: dict[str, Any]) -> None:
        self.record = dataclasses.replace(self.record, last_event_json=json.dumps(data, default=str))

    def stop_requested(self) -> str | None:
        return None  # nobody but a signal can stop a standalone worker


class ControlPlaneState:
    """The job in the store of ``settings.home``, created through JobService or adopted if queued there."""

    _EVENT_INTERVAL_S = 1.0

    def __init__(self, settings: Settings, request: CreateOptimizationJobRequest, plan: Plan) -> None:
        self.settings = settings
        self.store = Store(settings.db_path)
        self.name = request.optimization_job_name
        home = home_caller(settings)
        self.arn = home.job_arn(self.name)
        self._last_event = 0.0
        existing = self.store.find(*home.tenant, self.name)
        if existing is None:
            # start_executor=False: this worker runs the job; a local executor must not start another.
            # It runs with the credentials the scheduler gave its container (the job role of Batch,
            # IRSA on Kubernetes), so the record says ambient whatever a roles file elsewhere says.
            ambient = settings.model_copy(update={"role_credentials": "ambient", "roles_file": None})
            JobService(ambient, store=self.store, start_executor=False).create(request)
        elif existing.status != "STARTING" or existing.worker_pid is not None:
            raise ResourceInUse(
                f"Optimization job '{self.name}' already exists in the control plane at {settings.db_path} "
                f"with status {existing.status}"
                + (f" and worker pid {existing.worker_pid}" if existing.worker_pid else "")
                + "; job names must be unique. This worker did not touch it"
            )
        record = self.store.find(*home.tenant, self.name)
        assert record is not None
        self.key = record.job_key
        self.log = JobLog(record.log_path)

    @property
    def record(self) -> JobRecord:
        record = self.store.get(self.key)
        if record is None:
            raise RuntimeError(f"job {self.name} disappeared from {self.settings.db_path}")
        return record

    def describe(self) -> DescribeOptimizationJobResponse:
        return describe_record(self.record)

    def start(self) -> bool:
        pid = os.getpid()
        claimed = self.store.transition(
            self.key, expect=("STARTING",), to="INPROGRESS", start_time=now_ms(),
            worker_pid=pid, worker_ctime=process_ctime(pid), where_pid=(None, pid),
        )  # fmt: skip
        if claimed:
            self.log.write("lifecycle", "INPROGRESS", f"optjob-worker pid {pid} started on {os.uname().nodename}")
        return claimed

    def complete(self, image: str | None) -> bool:
        done = self.store.transition(self.key, expect=("INPROGRESS", "STOPPING"), to="COMPLETED", output_image=image)
        if done:
            self.log.write("lifecycle", "COMPLETED", "published by optjob-worker")
        return done

    def fail(self, reason: str, category: str) -> None:
        if not fail(self.store, self.key, reason, expect=("STARTING", "INPROGRESS"), category=category):
            end_stopping(self.store, self.key, f"ended while failing: {clip_reason(reason)}")

    def stopping(self, why: str) -> None:
        now = now_ms()
        if self.store.transition(self.key, expect=("STARTING", "INPROGRESS"), to="STOPPING",
                                 stop_reason=why, stop_requested_at=now):  # fmt: skip
            self.log.write("lifecycle", "STOPPING", f"optjob-worker stopping ({why})")

    def stopped(self, note: str) -> None:
        end_stopping(self.store, self.key, note)

    def record_event(self, data: dict[str, Any]) -> None:
        self.log.append({**data, "time": round(float(data.get("time", time.time())), 3)})
        now = time.monotonic()
        if now - self._last_event >= self._EVENT_INTERVAL_S:
            self.store.record_event(self.key, data)
            self._last_event = now

    def stop_requested(self) -> str | None:
        """``user`` or ``timeout`` once StopOptimizationJob (or an executor's timeout) marked the job."""
        record = self.store.get(self.key)
        if record is not None and record.status == "STOPPING":
            return record.stop_reason or "user"
        return None
