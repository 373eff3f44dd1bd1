"""Runs a one-stage plan whose stage works shard by shard, overlapping download, work and upload.

The flow is the same as ``run.run_plan`` — fetch, check, stage, verify, publish with the manifest
last — but the three overlap: a background thread downloads the weight files in order while the
stage quantizes the previous one, and each output shard is uploaded by a second thread as soon as
it is written, while the stage checks it. Memory stays at a few tensors, and the job takes about as
long as copying the model through this host. Nothing is a finished model until the manifest is
written; any failure removes what was uploaded.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from optjob.pipeline.job_parts import job_publisher, publish_streamed, stage_context
from optjob.pipeline.outcome import RunOutcome
from optjob.pipeline.plan import Plan
from optjob.pipeline.stage import StreamingTechnique, technique_for
from optjob.pipeline.stream_source import open_source, weight_order
from optjob.pipeline.transfer import ALLOW_PICKLE_ENV
from optjob.runtime.cancel import CancelToken
from optjob.runtime.events import EventSink
from optjob.storage.inputs import (
    check_model_dir,
    check_shard_against_index,
    safetensors_header,
)
from optjob.storage.s3 import MiB, S3Settings
from optjob.storage.stream import StreamingFetch, can_stream

GRANULARITY_ENV = "OPTJOB_STREAM_GRANULARITY"  # "file": the shard-at-a-time path (a fallback and a baseline)


def streaming_technique(plan: Plan) -> StreamingTechnique | None:
    """The plan's technique when the whole job can stream: one stage, shard-by-shard, a prefix source."""
    if len(plan.stages) != 1 or plan.stages[0].needs.whole_model_in_memory:
        return None
    if not plan.source.s3_uri or not can_stream(plan.source.s3_uri):
        return None
    technique = technique_for(plan.stages[0].technique)
    return technique if isinstance(technique, StreamingTechnique) else None


def run_streaming(
    plan: Plan,
    technique: StreamingTechnique,
    *,
    job_arn: str,
    work_dir: Path,
    events: EventSink,
    cancel: CancelToken,
    storage: S3Settings | None,
) -> RunOutcome:
    """Fetch, run and publish, overlapped, a whole file at a time; raises JobFailed subclasses or
    JobCancelled. (``run.run_plan`` sends a stage that maps tensors to tensors to
    ``tensor_streaming.run_tensor_streaming`` instead, unless ``OPTJOB_STREAM_GRANULARITY=file``.)"""
    stage = plan.stages[0]
    source_dir, out_dir = work_dir / "source", work_dir / f"stage-1-{stage.optimization_type.lower()}"
    out_dir.mkdir(parents=True, exist_ok=True)
    events("download", "list", 0.0, f"listing {plan.source.s3_uri}")
    fetch = StreamingFetch(plan.source.s3_uri, source_dir, settings=storage, cancel=cancel)
    weights = weight_order(fetch)
    small = sorted(set(fetch.remotes) - set(weights))
    fetch.start(order=small + weights)
    publisher = job_publisher(plan, job_arn, storage=storage, events=events, cancel=cancel)
    uploads: list[Future] = []
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="optjob-upload")
    try:
        weight_map = open_source(plan, fetch, source_dir, small, weights, publisher)

        def arriving() -> Iterator[Path]:
            total = fetch.total_bytes or 1
            for number, rel in enumerate(weights, 1):
                path = fetch.wait(rel)
                # A truncated shard, or one without the tensors the index promises, is the source's fault.
                check_shard_against_index(weight_map, rel, safetensors_header(path, rel))
                events("download", "file", fetch.bytes_done / total,
                       f"{number}/{len(weights)} weight files, {fetch.bytes_done / MiB:.0f} of {total / MiB:.0f} MiB",
                       bytes_done=fetch.bytes_done, bytes_total=total)  # fmt: skip
                for done in [f for f in uploads if f.done()]:
                    done.result()  # surface an upload failure now rather than at the end
                yield path

        def ship(path: Path) -> None:
            uploads.append(pool.submit(publisher.upload, path.relative_to(out_dir).as_posix(), path))

        ctx = stage_context(plan, stage, input_dir=source_dir, output_dir=out_dir, work_dir=work_dir, events=events,
                            cancel=cancel)  # fmt: skip
        events(stage.optimization_type, "start", 0.0, f"stage 1/1 via {stage.engine}, streaming shard by shard")
        result = technique.run_streaming(stage, ctx, arriving(), ship)
        events(stage.optimization_type, "done", 1.0, "stage 1/1 finished")
        fetched = fetch.result()
        check_model_dir(source_dir, allow_pickle=os.environ.get(ALLOW_PICKLE_ENV) == "1")
        waited = time.monotonic()
        for future in uploads:
            future.result()
        events("upload", "shards", None, f"{len(uploads)} shards uploaded ({time.monotonic() - waited:.1f} s wait)")
        cancel.raise_if_cancelled()
        return publish_streamed(plan, job_arn, publisher, stage=stage, result=result, source_dir=source_dir,
                                out_dir=out_dir, fetched=fetched)  # fmt: skip
    except BaseException:
        fetch.stop()
        for future in uploads:
            future.cancel()
        pool.shutdown(wait=True)
        publisher.rollback()
        raise
    finally:
        pool.shutdown(wait=True)
