"""The five operations' semantics, in one place, for every transport.

The CLI and the HTTP server both call ``JobService``; neither re-implements a rule. The service
only reads and writes the store: it never runs or signals a worker. Running jobs is the
executor's business (``optjob.jobs.executor``), which watches the store, so a Stop recorded here
by any process reaches the worker through the executor that owns it.

Every operation acts for a caller (``optjob.jobs.tenancy.Caller``: an account in a region; the
home caller when none is given, which is what the local CLI is). A caller sees only its own
jobs: another account's job answers ResourceNotFound exactly as a missing one does.

Choices where SageMaker is undocumented are listed in docs/jobs.md; the ones visible here:
names are case-sensitive and kept verbatim in the ARN; stopping a STOPPING job is a no-op;
stopping a terminal job and deleting a non-terminal one are ValidationExceptions.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from optjob.api.errors import (
    InternalFailure,
    ResourceInUse,
    ResourceLimitExceeded,
    ResourceNotFound,
    UnknownOperationException,
    ValidationException,
    parse,
)
from optjob.api.shapes import (
    CreateOptimizationJobRequest,
    CreateOptimizationJobResponse,
    DeleteOptimizationJobRequest,
    DescribeOptimizationJobRequest,
    DescribeOptimizationJobResponse,
    ListOptimizationJobsRequest,
    ListOptimizationJobsResponse,
    OptimizationJobModelSourceS3,
    OptimizationJobSummary,
    OptimizationSageMakerModel,
    Shape,
    StopOptimizationJobRequest,
)
from optjob.errors import JobFailed
from optjob.jobs.listing import list_jobs
from optjob.jobs.logs import JobLog
from optjob.jobs.outcomes import clip_reason
from optjob.jobs.store import (
    DuplicateJob,
    JobRecord,
    ModelRecord,
    Store,
    TooManyActiveJobs,
    now_ms,
    starting_record,
)
from optjob.jobs.tenancy import Caller, check_region, check_role, home_caller
from optjob.pipeline.plan import Plan, build_plan
from optjob.secret_files import SecretFileError
from optjob.settings import Settings, load_settings
from optjob.storage.credentials import roles_in_file

# Members of the stored request that Describe echoes (Tags are stored but, as in SageMaker, not).
_ECHOED = (
    "ModelSource",
    "OptimizationEnvironment",
    "DeploymentInstanceType",
    "MaxInstanceCount",
    "OptimizationConfigs",
    "OutputConfig",
    "RoleArn",
    "StoppingCondition",
    "VpcConfig",
    "TrainingPlanArns",
)

Planner = Callable[..., Plan]
log = logging.getLogger("optjob.service")


class JobService:
    """Create/Describe/List/Stop/Delete over one data directory."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        store: Store | None = None,
        planner: Planner = build_plan,
        clock: Callable[[], float] = time.time,
        start_executor: bool = True,
    ) -> None:
        """``start_executor``: after a Create or Stop, make sure an executor runs for this data
        directory (``optjob.jobs.daemon.ensure_executor``: one flock attempt when one already
        runs). It is on by default so a job created through any transport runs without anyone
        having started an executor first; tests of pure semantics turn it off."""
        self.settings = settings or load_settings()
        self.store = store or Store(self.settings.db_path)
        self._planner = planner
        self._clock = clock
        self._start_executor = start_executor
        self.home = home_caller(self.settings)

    # --- operations ----------------------------------------------------------------------

    def create(
        self, request: CreateOptimizationJobRequest, caller: Caller | None = None
    ) -> CreateOptimizationJobResponse:
        """Validate exactly as ``optjob validate`` does, check the caller may pass RoleArn, then
        store the job as STARTING in the caller's account and region."""
        caller = caller or self.home
        check_region(caller)
        check_role(caller, request.role_arn, self.settings, self._roles())
        try:
            plan = self._planner(request, region=caller.region, resolve_model=self._model_uri)
        except JobFailed as exc:  # a planner check that speaks the pipeline's language
            raise ValidationException(str(exc)) from None
        name = request.optimization_job_name
        arn = caller.job_arn(name)
        now = now_ms(self._clock())
        record = starting_record(
            request,
            plan,
            arn,
            now=now,
            log_path=str(self._log_path(name, now)),
            home=self.home.tenant,
            role_source=self.settings.role_source,
        )
        try:
            self.store.create_job(record, max_active=self.settings.max_active_jobs)
        except DuplicateJob:
            raise ResourceInUse(
                f"An optimization job named '{name}' already exists ({arn}); job names must be unique "
                f"within an account and region"
            ) from None
        except TooManyActiveJobs as exc:
            limit = self.settings.max_active_jobs
            raise ResourceLimitExceeded(
                f"The account-level service limit 'number of active optimization jobs' (counted across "
                f"regions) is {limit} Jobs, "
                f"with current utilization of {exc} Jobs and a request delta of 1 Jobs. Wait for a job "
                f"to reach a terminal state or raise OPTJOB_MAX_ACTIVE_JOBS"
            ) from None
        log = JobLog(record.log_path)
        log.write("lifecycle", "STARTING", f"created {arn}: {', '.join(plan.optimization_types)}")
        for warning in plan.all_warnings:
            log.write("plan", "warning", warning, level="warning")
        self._kick()
        return CreateOptimizationJobResponse(optimization_job_arn=arn)

    def describe(self, name: str, caller: Caller | None = None) -> DescribeOptimizationJobResponse:
        return describe_record(self.get(name, caller))

    def list(
        self, request: ListOptimizationJobsRequest | None = None, caller: Caller | None = None
    ) -> ListOptimizationJobsResponse:
        tenant = (caller or self.home).tenant
        records, token = list_jobs(self.store, request or ListOptimizationJobsRequest(), tenant)
        return ListOptimizationJobsResponse(
            optimization_job_summaries=[summarize(record) for record in records], next_token=token
        )

    def stop(self, name: str, caller: Caller | None = None) -> None:
        """STARTING/INPROGRESS -> STOPPING; the executor signals the worker and settles STOPPED.

        Stopping a job that is already STOPPING succeeds and changes nothing (a retried Stop
        must not fail); stopping a terminal job is a ValidationException.
        """
        while True:
            record = self.get(name, caller)
            if record.status == "STOPPING":
                return
            if record.terminal:
                raise ValidationException(
                    f"Optimization job '{name}' has already ended with status {record.status}; "
                    f"only a STARTING or INPROGRESS job can be stopped"
                )
            now = now_ms(self._clock())
            if self.store.transition(
                record.job_key,
                expect=(record.status,),
                to="STOPPING",
                now=now,
                stop_reason="user",
                stop_requested_at=now,
            ):
                JobLog(record.log_path).write("lifecycle", "STOPPING", "StopOptimizationJob requested")
                self._kick()
                return
            # The status changed under us (the worker started or finished): decide again.

    def delete(self, name: str, caller: Caller | None = None) -> None:
        """Remove a terminal job's record; its artifacts and log file are never touched."""
        outcome = self.store.delete_terminal(self.get(name, caller).job_key)
        if outcome == "missing":
            raise _not_found(name)
        if outcome != "deleted":
            raise ValidationException(
                f"Optimization job '{name}' is {outcome}; only a job in a terminal state (COMPLETED, "
                f"FAILED or STOPPED) can be deleted. Stop it and wait for STOPPED first"
            )

    # --- helpers for transports ----------------------------------------------------------

    def get(self, name: str, caller: Caller | None = None) -> JobRecord:
        """The caller's stored record (for logs, progress, wait); ResourceNotFound if there is none."""
        record = self.store.find(*(caller or self.home).tenant, name)
        if record is None:
            raise _not_found(name)
        return record

    def handle(self, operation: str, body: dict[str, Any] | None, caller: Caller | None = None) -> dict[str, Any]:
        """Dispatch one wire call for ``caller``: validate ``body``, run the operation, return the
        wire response.

        Raises ``ApiError`` subclasses (each has ``to_wire``/``http_status``) for the transport
        to render; Stop and Delete return ``{}``.
        """
        handlers: dict[str, tuple[type[Shape], Callable[[Any], Shape | None]]] = {
            "CreateOptimizationJob": (CreateOptimizationJobRequest, lambda r: self.create(r, caller)),
            "DescribeOptimizationJob": (
                DescribeOptimizationJobRequest,
                lambda r: self.describe(r.optimization_job_name, caller),
            ),
            "ListOptimizationJobs": (ListOptimizationJobsRequest, lambda r: self.list(r, caller)),
            "StopOptimizationJob": (StopOptimizationJobRequest, lambda r: self.stop(r.optimization_job_name, caller)),
            "DeleteOptimizationJob": (
                DeleteOptimizationJobRequest,
                lambda r: self.delete(r.optimization_job_name, caller),
            ),
        }
        if operation not in handlers:
            raise UnknownOperationException(f"Operation {operation} is not supported by optjob")
        check_region(caller or self.home)
        model, method = handlers[operation]
        result = method(parse(model, body if body is not None else {}))
        return result.dump() if result is not None else {}

    # --- model registry ------------------------------------------------------------------

    def register_model(self, name: str, s3_uri: str) -> None:
        """Record where a SageMakerModel's artifacts live (ModelSource/OutputConfig.SageMakerModel)."""
        # The API's own constraints, so a registered name is usable in a request.
        parse(OptimizationSageMakerModel, {"ModelName": name})
        parse(OptimizationJobModelSourceS3, {"S3Uri": s3_uri})
        if not name or not s3_uri:
            raise ValidationException("A model needs a non-empty name and S3 URI")
        self.store.register_model(name, s3_uri, now=self._clock())

    def list_models(self) -> list[ModelRecord]:
        return self.store.list_models()

    def _log_path(self, name: str, now: float) -> Path:
        """A fresh file per job, even when a deleted job's name is reused in the same millisecond."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
        return self.settings.logs_dir / f"{name}-{stamp}-{uuid.uuid4().hex[:8]}.log"

    def _roles(self) -> frozenset[str] | None:
        """The roles file's role ARNs (None without one); read per Create, so edits apply at once."""
        if self.settings.roles_file is None:
            return None
        try:
            return roles_in_file(self.settings.roles_file)
        except SecretFileError:
            log.exception("the roles file cannot be used")
            raise InternalFailure(
                "The optjob server cannot use its roles file; its operator must fix it (the server log says why)"
            ) from None

    def _kick(self) -> None:
        if self._start_executor:
            from optjob.jobs.daemon import ensure_executor  # the daemon imports the executor; keep it lazy

            ensure_executor(self.settings)

    def _model_uri(self, name: str) -> str | None:
        model = self.store.get_model(name)
        return model.s3_uri if model else None


def _not_found(name: str) -> ResourceNotFound:
    return ResourceNotFound(f"Could not find optimization job '{name}'")


def describe_record(record: JobRecord) -> DescribeOptimizationJobResponse:
    """A stored job as DescribeOptimizationJob's response (every member SageMaker returns)."""
    request = json.loads(record.request_json)
    wire: dict[str, Any] = {key: request[key] for key in _ECHOED if key in request}
    wire.update(
        OptimizationJobArn=record.arn,
        OptimizationJobName=record.name,
        OptimizationJobStatus=record.status,
        CreationTime=record.creation_time,
        LastModifiedTime=record.last_modified_time,
    )
    if record.start_time is not None:
        wire["OptimizationStartTime"] = record.start_time
    if record.end_time is not None and record.terminal:
        wire["OptimizationEndTime"] = record.end_time
    if record.status == "FAILED":
        wire["FailureReason"] = clip_reason(record.failure_reason or "")
    if record.status == "COMPLETED" and record.output_image:
        wire["OptimizationOutput"] = {"RecommendedInferenceImage": record.output_image}
    return DescribeOptimizationJobResponse.model_validate(wire)


def summarize(record: JobRecord) -> OptimizationJobSummary:
    wire: dict[str, Any] = {
        "OptimizationJobName": record.name,
        "OptimizationJobArn": record.arn,
        "CreationTime": record.creation_time,
        "OptimizationJobStatus": record.status,
        "LastModifiedTime": record.last_modified_time,
        "DeploymentInstanceType": record.instance_type,
        "OptimizationTypes": record.types,
    }
    if record.start_time is not None:
        wire["OptimizationStartTime"] = record.start_time
    if record.end_time is not None and record.terminal:
        wire["OptimizationEndTime"] = record.end_time
    if record.max_instance_count is not None:
        wire["MaxInstanceCount"] = record.max_instance_count
    return OptimizationJobSummary.model_validate(wire)
