"""Executes a Plan: fetch the source, run each stage, verify, publish. One way, top to bottom.

Every stage writes a fresh directory; the next stage reads it. Nothing reaches the output
location until the last stage has produced a verified model, and the manifest is written last,
so a failed or stopped job never leaves something that looks finished. Cancellation is checked
between units of work; on any exit the job's scratch directory is removed.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from optjob.pipeline.job_parts import job_publisher, stage_context
from optjob.pipeline.outcome import RunOutcome
from optjob.pipeline.plan import Plan
from optjob.pipeline.scratch import discard
from optjob.pipeline.shard_farm import ShardFarm
from optjob.pipeline.stage import TensorStreamingTechnique, technique_for
from optjob.pipeline.streaming import GRANULARITY_ENV, run_streaming, streaming_technique
from optjob.pipeline.tensor_streaming import run_tensor_streaming
from optjob.pipeline.transfer import SourceModel, build_manifest, fetch_source, publish_output
from optjob.runtime.cancel import CancelToken
from optjob.runtime.events import NULL_SINK, EventSink
from optjob.storage.progress import fingerprint
from optjob.storage.s3 import S3Settings
from optjob.storage.staging import StageStore

# A deliberately slow first step for lifecycle tests and demos of Stop/timeout: the job sleeps this
# many seconds (checking for cancellation) before fetching. Never set in production.
DEBUG_DELAY_ENV = "OPTJOB_DEBUG_DELAY_SECONDS"


def debug_delay(events: EventSink, cancel: CancelToken) -> None:
    seconds = float(os.environ.get(DEBUG_DELAY_ENV, "0") or 0)
    if seconds <= 0:
        return
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < seconds:
        events("debug-delay", "sleeping", elapsed / seconds, f"{DEBUG_DELAY_ENV}={seconds:g}")
        if cancel.wait(min(0.5, seconds - elapsed)):
            break
    cancel.raise_if_cancelled()


def open_staging(
    plan: Plan, job_arn: str, source: SourceModel, storage: S3Settings | None, events: EventSink, cancel: CancelToken
) -> StageStore:
    """Claim the output prefix before the first stage (a rerun of this job may take it back) and
    open the record of finished stages."""
    publisher = job_publisher(plan, job_arn, storage=storage, events=events, cancel=cancel)
    publisher.open()
    files = [(f.path, f.etag or "", f.size) for f in source.fetched.files]
    identity = fingerprint(files, plan.model_dump(mode="json"))
    return StageStore(publisher, identity, settings=storage or S3Settings(), events=events, cancel=cancel)


def run_stages(
    plan: Plan,
    model_dir: Path,
    work_dir: Path,
    *,
    events: EventSink,
    cancel: CancelToken,
    storage: Any = None,
    staging: StageStore | None = None,
) -> tuple[Path, RunOutcome]:
    """Run every planned stage over a local model directory; returns the final directory.

    With ``staging`` (a job of several stages), each stage but the last is kept when it finishes, and
    the stages an earlier attempt of the job finished are taken from there instead of run again."""
    outcome = RunOutcome(recommended_image=plan.recommended_image, warnings=list(plan.all_warnings))
    names = [f"stage-{index}-{stage.optimization_type.lower()}" for index, stage in enumerate(plan.stages, 1)]
    done = _restored_stages(names, work_dir, staging) if staging is not None else {}
    current = model_dir
    for index, stage in enumerate(plan.stages, 1):
        cancel.raise_if_cancelled()
        out_dir = work_dir / names[index - 1]
        if index <= len(done):
            metrics, warnings = done[names[index - 1]]
            outcome.metrics[f"{index}:{stage.optimization_type}"] = metrics
            outcome.warnings.extend(w for w in warnings if w not in outcome.warnings)
            events(stage.optimization_type, "done", 1.0, f"stage {index}/{len(plan.stages)} finished by an "
                   "earlier attempt of this job")  # fmt: skip
            current = out_dir
            continue
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        events(stage.optimization_type, "start", 0.0, f"stage {index}/{len(plan.stages)} via {stage.engine}")
        ctx = stage_context(plan, stage, input_dir=current, output_dir=out_dir, work_dir=work_dir, events=events,
                            cancel=cancel, storage=storage)  # fmt: skip
        result = technique_for(stage.technique).run(stage, ctx)
        outcome.metrics[f"{index}:{stage.optimization_type}"] = result.metrics
        outcome.warnings.extend(w for w in result.warnings if w not in outcome.warnings)
        events(stage.optimization_type, "done", 1.0, f"stage {index}/{len(plan.stages)} finished")
        if staging is not None and index < len(plan.stages):
            staging.save(names[index - 1], out_dir, result.metrics, list(result.warnings))
        current = out_dir
    return current, outcome


def _restored_stages(
    names: list[str], work_dir: Path, staging: StageStore
) -> dict[str, tuple[dict[str, Any], list[str]]]:
    """The leading stages an earlier attempt finished: the last one's directory downloaded and
    re-checked, every one's figures and warnings; empty when there are none (or the download does
    not match)."""
    finished = 0
    while finished < len(names) - 1 and staging.finished(names[finished]) is not None:
        finished += 1
    if not finished:
        return {}
    last = names[finished - 1]
    out_dir = work_dir / last
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    if staging.restore(last, out_dir) is None:
        return {}
    staging.carry_over(names[:finished])
    units = [staging.finished(name) for name in names[:finished]]
    return {
        name: (dict(unit.stage.get("metrics", {})), list(unit.stage.get("warnings", [])))
        for name, unit in zip(names, units, strict=False)
        if unit
    }


def run_plan(
    plan: Plan,
    *,
    work_dir: Path,
    job_arn: str | None = None,
    events: EventSink = NULL_SINK,
    cancel: CancelToken | None = None,
    storage: S3Settings | None = None,
    farm: ShardFarm | None = None,
) -> RunOutcome:
    """The whole job in this process. Raises JobFailed subclasses or JobCancelled.

    ``farm``: helper workers (MaxInstanceCount > 1) for a job that streams tensor by tensor; other
    jobs run here alone.

    Nothing is presented as a finished model before every stage has finished and verified: the
    manifest is written last, and a failure removes whatever was uploaded. The scratch directory
    (source, intermediate stages) is removed on every exit: moved aside at once and deleted on a
    background thread the process waits for at exit (``scratch.discard``).
    """
    cancel = cancel or CancelToken()
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        debug_delay(events, cancel)
        if job_arn is None:
            raise ValueError("run_plan needs the job's ARN to write the manifest")
        streaming = streaming_technique(plan)
        if isinstance(streaming, TensorStreamingTechnique) and os.environ.get(GRANULARITY_ENV, "tensor") != "file":
            return run_tensor_streaming(
                plan, streaming, job_arn=job_arn, work_dir=work_dir, events=events, cancel=cancel, storage=storage,
                farm=farm,
            )  # fmt: skip
        if streaming is not None:
            return run_streaming(
                plan, streaming, job_arn=job_arn, work_dir=work_dir, events=events, cancel=cancel, storage=storage
            )
        source = fetch_source(plan, work_dir, settings=storage, events=events, cancel=cancel)
        staging = open_staging(plan, job_arn, source, storage, events, cancel) if len(plan.stages) > 1 else None
        try:
            final_dir, outcome = run_stages(plan, source.path, work_dir, events=events, cancel=cancel,
                                            storage=storage, staging=staging)  # fmt: skip
            cancel.raise_if_cancelled()
            manifest = build_manifest(plan, job_arn, source, outcome.metrics, outcome.warnings)
            claimed = staging.publisher if staging is not None else None
            outcome.source_bytes = source.fetched.total_bytes
            outcome.bytes_downloaded = source.fetched.bytes_downloaded
            published = publish_output(plan, final_dir, manifest, settings=storage, events=events, cancel=cancel,
                                       publisher=claimed)  # fmt: skip
            outcome.published = [file.path for file in published.files]
            outcome.output_bytes = published.total_bytes
        except BaseException:
            if staging is not None:
                staging.publisher.rollback()
                staging.clear()
            raise
        if staging is not None:
            staging.clear()
        return outcome
    finally:
        discard(work_dir)
