"""The parts every runner builds from the plan the same way: the job's publisher, a stage's context,
and, for a one-stage streamed job, the manifest → commit → outcome ending.

Four runners (whole model, file stream, tensor stream, a helper's shard) each need them; one
definition keeps what a stage can reach and what a published job records the same on every path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from optjob.pipeline.outcome import RunOutcome
from optjob.pipeline.plan import Plan
from optjob.pipeline.stage import PlannedStage, StageContext, StageResult
from optjob.pipeline.transfer import SourceModel, build_manifest
from optjob.runtime.cancel import CancelToken
from optjob.runtime.events import NULL_SINK, EventSink
from optjob.runtime.phases import PhaseClock
from optjob.storage.publish import Publisher
from optjob.storage.s3 import S3Settings
from optjob.storage.source import FetchedModel


def job_publisher(
    plan: Plan, job_arn: str, *, storage: S3Settings | None, cancel: CancelToken, events: EventSink = NULL_SINK
) -> Publisher:
    """The publisher of the job's output prefix (not yet opened: ``open`` claims the prefix)."""
    return Publisher(
        plan.output.s3_uri, job_name=plan.job_name, job_arn=job_arn, kms_key_id=plan.output.kms_key_id,
        settings=storage, events=events, cancel=cancel,
    )  # fmt: skip


def stage_context(
    plan: Plan,
    stage: PlannedStage,
    *,
    input_dir: Path,
    output_dir: Path,
    work_dir: Path,
    cancel: CancelToken,
    events: EventSink = NULL_SINK,
    storage: Any = None,
    clock: PhaseClock | None = None,
) -> StageContext:
    """Everything ``stage`` may touch, and nothing else."""
    return StageContext(
        job_name=plan.job_name, input_dir=input_dir, output_dir=output_dir, work_dir=work_dir, target=plan.target,
        env=stage.env, events=events, cancel=cancel, storage=storage, clock=clock,
    )  # fmt: skip


def publish_streamed(
    plan: Plan,
    job_arn: str,
    publisher: Publisher,
    *,
    stage: PlannedStage,
    result: StageResult,
    source_dir: Path,
    out_dir: Path,
    fetched: FetchedModel,
) -> RunOutcome:
    """A one-stage streamed job's ending: the manifest written last over what was streamed, and the outcome."""
    metrics: dict[str, Any] = {f"1:{stage.optimization_type}": result.metrics}
    warnings = list(dict.fromkeys([*plan.all_warnings, *result.warnings]))
    manifest = build_manifest(plan, job_arn, SourceModel(path=source_dir, fetched=fetched), metrics, warnings)
    published = publisher.commit(out_dir, manifest)
    return RunOutcome(
        plan.recommended_image, warnings, metrics, [file.path for file in published.files],
        source_bytes=fetched.total_bytes, output_bytes=published.total_bytes,
        bytes_downloaded=fetched.bytes_downloaded,
    )  # fmt: skip
