"""A helper worker's entry point (MaxInstanceCount > 1): make one output shard of a tensor-streamed job.

The scheduler (``shard_farm``) decides which shard a helper gets and accepts what it made; the
executor's farm (``optjob.jobs.ray_farm`` on Ray) runs ``timed_unit`` on another node. A helper never
claims the output prefix, never writes the manifest or the progress record, and never deletes
anything but its own unfinished upload: the job's worker owns the prefix.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from optjob.errors import InputError
from optjob.pipeline.job_parts import job_publisher, stage_context
from optjob.pipeline.plan import Plan
from optjob.pipeline.shard_farm import HelperResult
from optjob.pipeline.stage import TensorStreamingTechnique, technique_for
from optjob.pipeline.stream_output import open_shard_output, streaming_settings
from optjob.pipeline.stream_source import weight_order
from optjob.runtime.cancel import CancelToken
from optjob.runtime.phases import PhaseClock
from optjob.storage.progress import FinishedUnit
from optjob.storage.stream import StreamingFetch
from optjob.storage.tensorstream.reader import RemoteShard


class _Collected:
    """Stands in for the job's progress log in a helper: the finished unit goes back to the job's worker."""

    def __init__(self) -> None:
        self.units: list[FinishedUnit] = []

    def record(self, unit: FinishedUnit) -> None:
        self.units.append(unit)


def run_shard_unit(plan: Plan, *, job_arn: str, rel: str, etag: str, work_dir: Path, storage: Any,
                   cancel: CancelToken | None = None) -> FinishedUnit:  # fmt: skip
    """A helper's work: make output shard ``rel`` of the job and upload it; the caller reports the unit.

    The helper never claims the output prefix, never writes the manifest or the progress record, and
    never deletes anything but its own unfinished upload: the job's worker owns the prefix.
    """
    cancel = cancel or CancelToken()
    stage = plan.stages[0]
    technique = technique_for(stage.technique)
    if not isinstance(technique, TensorStreamingTechnique):
        raise InputError(f"{stage.technique} cannot be split over several workers")
    source_dir, out_dir = work_dir / "source", work_dir / "output"
    out_dir.mkdir(parents=True, exist_ok=True)
    read_ahead, window, _budget = streaming_settings()
    try:
        fetch = StreamingFetch(plan.source.s3_uri, source_dir, settings=storage, cancel=cancel)
        weights = weight_order(fetch)
        if fetch.remotes[rel].etag != etag:
            raise InputError(f"{rel} changed in {plan.source.s3_uri} while the job ran (ETag {etag} is gone)")
        small = sorted(set(fetch.remotes) - set(weights))
        fetch.start(order=small, only=True)
        for name in small:
            fetch.wait(name)
        clock = PhaseClock()
        publisher = job_publisher(plan, job_arn, storage=storage, cancel=cancel)
        collected = _Collected()
        shard = RemoteShard(fetch.client, fetch.location.bucket, fetch.remotes[rel], read_ahead=read_ahead,
                            cancel=cancel, clock=clock, spool=source_dir / rel)  # fmt: skip
        ctx = stage_context(plan, stage, input_dir=source_dir, output_dir=out_dir, work_dir=work_dir, cancel=cancel,
                            clock=clock)  # fmt: skip
        try:
            technique.run_tensor_units(
                stage, ctx, [shard], open_shard_output(publisher, collected, out_dir, window, clock)
            )
            shard.finish()
        finally:
            shard.close()
            fetch.stop()
        if len(collected.units) != 1:
            raise RuntimeError(f"the stage made {len(collected.units)} files from {rel}, expected 1")
        return collected.units[0]
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def timed_unit(plan_json: str, job_arn: str, rel: str, etag: str, work_dir: str, storage: Any, node: str) -> dict:
    """``run_shard_unit`` for a remote call: plain data in and out, failures reported, not raised."""
    started = time.monotonic()
    try:
        unit = run_shard_unit(Plan.model_validate_json(plan_json), job_arn=job_arn, rel=rel, etag=etag,
                              work_dir=Path(work_dir), storage=storage)  # fmt: skip
    except BaseException as exc:  # noqa: BLE001 - the job's worker does the shard itself instead
        return {"rel": rel, "node": node, "seconds": time.monotonic() - started,
                "error": f"{type(exc).__name__}: {str(exc)[:300]}"}  # fmt: skip
    return {"rel": rel, "node": node, "seconds": time.monotonic() - started, "unit": unit.model_dump(mode="json")}


def helper_result(payload: dict) -> HelperResult:
    unit = FinishedUnit.model_validate(payload["unit"]) if payload.get("unit") else None
    return HelperResult(rel=payload["rel"], node=payload["node"], seconds=payload["seconds"], unit=unit,
                        error=payload.get("error"))  # fmt: skip
