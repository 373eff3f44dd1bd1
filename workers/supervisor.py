"""One job from spec to exit status: the order of things, and who decides the ending.

1. Report the host (first log line), read the spec, validate it exactly like Create.
2. Refuse a plan this host cannot run (``workers.capability``), before any download.
3. Run the pipeline in a child process (``workers.child``), relaying its progress to the JSON
   log, to the status object and, with a control plane, to the store.
4. A stop (SIGTERM/SIGINT, StopOptimizationJob recorded in the control plane, or
   MaxRuntimeInSeconds) is forwarded to the child as SIGTERM; the child cancels, cleans up and
   publishes nothing. If it has not ended when the grace period (``OPTJOB_STOP_GRACE_SECONDS``,
   less a reserve for the final writes) runs out, it is killed and its partial uploads removed.
5. Write the final status and exit with the code of ``workers.exitcodes``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from pydantic import ValidationError

import workers
from optjob.api.errors import ApiError, ResourceLimitExceeded, parse
from optjob.api.shapes import CreateOptimizationJobRequest
from optjob.errors import JobFailed
from optjob.jobs.outcomes import signal_name
from optjob.jobs.store import Store, StoreError
from optjob.jobs.tenancy import home_caller
from optjob.pipeline.plan import Plan
from optjob.settings import Settings, load_settings
from optjob.storage.s3 import make_client
from workers import exitcodes
from workers.capability import refusal
from workers.cleanup import list_prefix, remove_partial
from workers.host import HostInfo, detect_host
from workers.jsonlog import JsonLog
from workers.spec import NoSpec, choose_source, load_raw, no_registry, plan_request
from workers.state import ControlPlaneState, JobState, LocalState
from workers.status import StatusWriter

WORK_DIR_ENV = "OPTJOB_WORK_DIR"
CONTROL_PLANE_ENV = "OPTJOB_CONTROL_PLANE"
_POLL_S = 0.25
_CONTROL_PLANE_POLL_S = 2.0


@dataclass(frozen=True)
class Options:
    spec: str | None = None
    control_plane: bool = False
    work_dir: Path | None = None


@dataclass
class ChildResult:
    kind: str  # completed | failed | cancelled | died
    data: dict[str, Any]
    returncode: int | None


def stop_reserve_s(grace_s: float) -> float:
    """Seconds of the grace period kept for the final status write and cleanup after killing the child."""
    return min(15.0, grace_s / 4)


class Supervisor:
    def __init__(self, options: Options, log: JsonLog | None = None) -> None:
        self.options = options
        self.log = log or JsonLog()
        self._stop_reason: str | None = None  # "user" or "timeout", once a stop was asked for
        self._stop_signal: int | None = None
        self._child: subprocess.Popen[bytes] | None = None
        self._wake = threading.Event()

    # --- signals ---------------------------------------------------------------------------

    def install_signals(self) -> None:
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, self._on_signal)

    def _on_signal(self, number: int, frame: FrameType | None) -> None:
        if self._stop_reason is None:
            self._stop_reason = "user"
            self._stop_signal = number
        self._wake.set()

    # --- the job ---------------------------------------------------------------------------

    def run(self) -> int:
        host = detect_host()
        self.log.info("host", version=workers.__version__, **host.as_dict())
        try:
            source = choose_source(self.options.spec)
        except NoSpec as exc:
            self.log.error("spec", message=str(exc))
            return self._exit(exitcodes.EXIT_USAGE, None)
        try:
            settings = load_settings()
        except ValidationError as exc:  # e.g. OPTJOB_STOP_GRACE_SECONDS=abc: a configuration mistake
            self.log.error("settings", message=f"invalid OPTJOB_*/AWS_REGION settings: {exc}")
            return self._exit(exitcodes.EXIT_USAGE, None)
        self.log.info("spec", source=source.describe())
        try:
            raw = load_raw(source)
            request = parse(CreateOptimizationJobRequest, raw)
        except JobFailed as exc:
            self.log.error("spec", message=str(exc), category=exc.category)
            return self._exit(exitcodes.for_failure(exc.category), None)
        except ApiError as exc:  # the shapes: no valid request, so no valid Describe to write either
            self.log.error("spec", code=exc.code, message=exc.message)
            return self._exit(exitcodes.EXIT_INPUT, None)
        self.log.bind(request.optimization_job_name)
        return self._run_request(request, settings, host)

    def _run_request(self, request: CreateOptimizationJobRequest, settings: Settings, host: HostInfo) -> int:
        try:
            resolver = self._resolver(settings)
        except (StoreError, OSError) as exc:
            self.log.error("control-plane", message=f"the control plane store is unusable: {exc}")
            return self._exit(exitcodes.EXIT_INFRASTRUCTURE, None)
        try:
            plan: Plan | None = plan_request(request, region=settings.region, resolve_model=resolver)
            error: ApiError | None = None
        except ApiError as exc:
            plan, error = None, exc
        try:
            state: JobState = (
                ControlPlaneState(settings, request, plan)
                if self.options.control_plane and plan is not None
                else LocalState(request, plan, home_caller(settings).job_arn(request.optimization_job_name))
            )
        except ApiError as exc:  # the name is taken in the control plane, or its limit is reached
            self.log.error("control-plane", code=exc.code, message=exc.message)
            code = exitcodes.EXIT_INFRASTRUCTURE if isinstance(exc, ResourceLimitExceeded) else exitcodes.EXIT_INPUT
            return self._exit(code, None)
        except (StoreError, OSError) as exc:
            self.log.error("control-plane", message=f"the control plane store is unusable: {exc}")
            return self._exit(exitcodes.EXIT_INFRASTRUCTURE, None)
        try:
            status = StatusWriter(
                state, request.output_config.s3_output_location,
                kms_key_id=request.output_config.kms_key_id, host=host.as_dict(), log=self.log,
            )  # fmt: skip
        except JobFailed as exc:  # an S3OutputLocation the API pattern allows but no S3 client can use
            self.log.error("status", message=str(exc), category=exc.category)
            return self._exit(exitcodes.for_failure(exc.category), None)
        plane = str(settings.db_path) if self.options.control_plane else None
        self.log.info("status", uri=status.uri, control_plane=plane)
        if error is not None or plan is None:
            assert error is not None
            return self._finish(state, status, "input", error.message)
        status.warnings(plan.all_warnings)
        self.log.info(
            "plan",
            target=f"{plan.target.name}: {plan.target.describe()}",
            stages=[{"optimization_type": s.optimization_type, "engine": s.engine, "needs": s.needs.model_dump()}
                    for s in plan.stages],
            recommended_image=plan.recommended_image,
            warnings=plan.all_warnings or None,
        )  # fmt: skip
        if self._stop_reason:
            return self._stopped_before_start(state, status)
        reason = refusal(plan, host)
        if reason:
            return self._finish(state, status, "host", reason)
        return self._run_plan(request, plan, settings, state, status)

    def _resolver(self, settings: Settings) -> Callable[[str], str | None]:
        if not self.options.control_plane:
            return no_registry
        store = Store(settings.db_path)

        def resolve(name: str) -> str | None:
            model = store.get_model(name)
            return model.s3_uri if model else None

        return resolve

    def _run_plan(
        self, request: CreateOptimizationJobRequest, plan: Plan, settings: Settings, state: JobState,
        status: StatusWriter,
    ) -> int:  # fmt: skip
        output_uri = request.output_config.s3_output_location
        client = make_client()
        try:
            before = list_prefix(client, output_uri)
        except JobFailed as exc:
            return self._finish(state, status, exc.category, str(exc))
        if not state.start():
            if state.stop_requested():
                return self._stopped_before_start(state, status)
            self.log.error("control-plane", message="another worker claimed this job first; this one did nothing")
            return self._exit(exitcodes.EXIT_INPUT, None)
        status.write()
        status.start_heartbeat()
        job_dir = self._job_dir(state.name)
        try:
            result = self._supervise(plan, state, status, settings, job_dir, request)
        finally:
            shutil.rmtree(job_dir, ignore_errors=True)
        if result.kind == "died":
            try:
                removed = remove_partial(client, output_uri, state.arn, before)
            except Exception as exc:  # noqa: BLE001 - report, the job's ending matters more
                self.log.warning("cleanup", message=f"could not remove partial output under {output_uri}: {exc}")
            else:
                if removed:
                    self.log.info("cleanup", message=f"removed {len(removed)} partial objects", keys=removed[:20])
        return self._conclude(result, state, status, settings)

    def _job_dir(self, name: str) -> Path:
        default = Path(tempfile.gettempdir()) / "optjob-worker"
        root = self.options.work_dir or Path(os.environ.get(WORK_DIR_ENV) or default)
        job_dir = root / f"{name}-{os.getpid()}"
        job_dir.mkdir(parents=True, exist_ok=True)
        return job_dir

    # --- the child -------------------------------------------------------------------------

    def _supervise(
        self, plan: Plan, state: JobState, status: StatusWriter, settings: Settings, job_dir: Path,
        request: CreateOptimizationJobRequest,
    ) -> ChildResult:  # fmt: skip
        job_file = job_dir / "job.json"
        job_file.write_text(json.dumps({
            "plan": plan.model_dump(mode="json"), "job_arn": state.arn, "work_dir": str(job_dir / "work"),
        }))  # fmt: skip
        read_fd, write_fd = os.pipe()
        env = dict(os.environ)
        package_root = str(Path(workers.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        try:
            self._child = subprocess.Popen(
                [sys.executable, "-m", "workers.child", str(job_file), str(write_fd)],
                pass_fds=(write_fd,), stdin=subprocess.DEVNULL, stdout=sys.stderr.fileno(), env=env,
            )  # fmt: skip
        finally:
            os.close(write_fd)
        outcome: dict[str, Any] = {}
        reader = threading.Thread(
            target=self._read_child, args=(read_fd, state, status, outcome), name="optjob-child-events", daemon=True
        )
        reader.start()
        self._watch(state, status, settings, request)
        reader.join(timeout=10)
        returncode = self._child.returncode
        if outcome:
            return ChildResult(outcome.pop("kind"), outcome, returncode)
        return ChildResult("died", {}, returncode)

    def _read_child(self, fd: int, state: JobState, status: StatusWriter, outcome: dict[str, Any]) -> None:
        with os.fdopen(fd, "r", encoding="utf-8") as stream:
            for line in stream:
                try:
                    message = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if message.get("kind") == "event":
                    event = message["event"]
                    self.log.progress(event)
                    status.progress(event)
                    try:
                        state.record_event(event)
                    except (StoreError, OSError) as exc:
                        self.log.warning("control-plane", message=f"could not record progress: {exc}")
                else:
                    outcome.clear()
                    outcome.update(message)

    def _watch(
        self, state: JobState, status: StatusWriter, settings: Settings, request: CreateOptimizationJobRequest
    ) -> None:
        """Wait for the child; turn stops and the runtime limit into SIGTERM, then SIGKILL after the grace."""
        assert self._child is not None
        max_runtime = request.stopping_condition.max_runtime_in_seconds
        started = time.monotonic()
        grace = settings.stop_grace_s
        kill_at: float | None = None
        next_poll = started
        while self._child.poll() is None:
            self._wake.wait(_POLL_S)
            self._wake.clear()
            now = time.monotonic()
            if self._stop_reason is None and max_runtime is not None and now - started >= max_runtime:
                self._stop_reason = "timeout"
            if self._stop_reason is None and now >= next_poll:
                next_poll = now + _CONTROL_PLANE_POLL_S
                with contextlib.suppress(StoreError, OSError):
                    self._stop_reason = state.stop_requested()
            if self._stop_reason is not None and kill_at is None:
                kill_at = now + max(grace - stop_reserve_s(grace), 1.0)
                self._begin_stop(state, status)
            if kill_at is not None and now >= kill_at:
                self.log.warning("stop", message=f"the pipeline did not stop within {grace:g} s; killing it")
                with contextlib.suppress(ProcessLookupError):
                    self._child.kill()
                self._child.wait()
                return

    def _begin_stop(self, state: JobState, status: StatusWriter) -> None:
        why = self._stop_reason or "user"
        cause = (
            signal_name(self._stop_signal)
            if self._stop_signal
            else ("MaxRuntimeInSeconds reached" if why == "timeout" else "StopOptimizationJob")
        )
        self.log.info("stop", message=f"stopping: {cause}", reason=why)
        state.stopping(why)
        status.write()
        if self._child is not None:
            with contextlib.suppress(ProcessLookupError):
                self._child.send_signal(signal.SIGTERM)

    # --- endings ---------------------------------------------------------------------------

    def _conclude(self, result: ChildResult, state: JobState, status: StatusWriter, settings: Settings) -> int:
        published = result.data.get("published") or []
        if result.kind == "completed":
            status.warnings(result.data.get("warnings") or [])
            state.complete(result.data.get("recommended_image"))
            return self._final(state, status, "input", published)
        if result.kind == "failed":
            category = str(result.data.get("category", "internal"))
            return self._finish(state, status, category, str(result.data.get("reason", "unknown error")))
        if result.kind == "cancelled":
            if self._stop_reason is None:  # the signal reached the child only (e.g. a process-group signal)
                self._stop_reason = "user"
                state.stopping("user")
            state.stopped("stopped cleanly; partial output discarded")
            return self._final(state, status, "input", [])
        # died: no outcome from the child
        if self._stop_reason is not None:
            state.stopping(self._stop_reason)
            state.stopped(f"the pipeline did not stop within the {settings.stop_grace_s:g} s grace period and was "
                          "killed; partial output removed")  # fmt: skip
            return self._final(state, status, "input", [])
        return self._finish(state, status, "infrastructure", died_reason(result.returncode))

    def _finish(self, state: JobState, status: StatusWriter, category: str, reason: str) -> int:
        self.log.error("failed", category=category, message=reason)
        state.fail(reason, category)
        return self._final(state, status, category, [])

    def _stopped_before_start(self, state: JobState, status: StatusWriter) -> int:
        state.stopping(self._stop_reason or "user")
        state.stopped("stopped before the work began; nothing ran")
        return self._final(state, status, "input", [])

    def _final(self, state: JobState, status: StatusWriter, category: str, published: list[str]) -> int:
        """Exit code from the status the job actually ended in (a Stop that raced a failure wins)."""
        described = state.describe()
        final = described.optimization_job_status
        if final == "COMPLETED":
            code = exitcodes.EXIT_COMPLETED
        elif final == "STOPPED":
            code = exitcodes.EXIT_STOPPED
        elif (described.failure_reason or "").startswith("MaxRuntimeExceeded"):
            code = exitcodes.EXIT_INPUT
        else:
            code = exitcodes.for_failure(category)
        status.stop_heartbeat()
        status.finish(code, published if final == "COMPLETED" else None)
        written = status.write()
        return self._exit(code, final, status_written=written, failure_reason=described.failure_reason)

    def _exit(self, code: int, final: str | None, **fields: Any) -> int:
        self.log.info("exit", exit_code=code, status=final, **fields)
        return code


def died_reason(returncode: int | None) -> str:
    """FailureReason for a pipeline process that ended without reporting an outcome."""
    if returncode is not None and returncode < 0:
        number = -returncode
        text = f"the pipeline process was killed by signal {number} ({signal_name(number)})"
        if number == signal.SIGKILL:
            text += ("; when nobody sent it, this is the kernel's out-of-memory killer: give the container more "
                     "memory (the job's peak is logged in its last progress lines)")  # fmt: skip
        return text + "; partial output was removed. Retry the job"
    return (
        f"the pipeline process exited with status {returncode} without reporting an outcome (see the "
        "container's stderr); partial output was removed. Retry the job"
    )
