"""Runs a one-stage plan whose stage maps tensors to tensors, a tensor at a time, from S3 to S3.

``streaming.run_streaming`` overlaps whole files: a shard must arrive complete before it is
worked on, and be written complete before it is uploaded, so a 5 GB shard costs 5 GB of waiting
and the job cannot finish much before ``download + work + upload`` of the largest shard. Here each
source shard is read with ranged GETs a bounded window ahead (``storage.tensorstream.reader``), the
stage computes each output header up front and writes tensors as they are made into a multipart
upload (``storage.tensorstream.multipart``), so download, quantization and upload of one shard
overlap, and memory is the configured buffers plus a few copies of the largest quantized weight
(``configs/streaming.yaml``).

Checked on the way: every source object's size, its ETag (If-Match on every GET) and, where the
source records one, its sha256; every quantized tensor decoded and compared with its source; every
output's sha256. Both sides are also spooled to local disk, where the checks that need whole
layers (the end-to-end replay, the transformers load check) read them after the stream. As
before, nothing is a model until the manifest is written last; a failure aborts the uploads in
flight and removes what was uploaded.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from optjob.errors import JobFailed
from optjob.pipeline.job_parts import job_publisher, publish_streamed, stage_context
from optjob.pipeline.outcome import RunOutcome
from optjob.pipeline.plan import Plan
from optjob.pipeline.shard_farm import FarmedShards, ShardFarm
from optjob.pipeline.stage import TensorStreamingTechnique
from optjob.pipeline.stream_output import check_memory_limit, open_shard_output, streaming_settings
from optjob.pipeline.stream_source import open_source, weight_order
from optjob.pipeline.transfer import ALLOW_PICKLE_ENV
from optjob.runtime.cancel import CancelToken
from optjob.runtime.events import EventSink
from optjob.runtime.phases import PhaseClock
from optjob.storage.inputs import check_model_dir, check_shard_against_index
from optjob.storage.progress import FinishedUnit, Progress, ProgressLog, fingerprint
from optjob.storage.publish import Publisher, sse_args
from optjob.storage.s3 import MiB, S3Settings
from optjob.storage.source import FetchedFile, FetchedModel, RemoteFile
from optjob.storage.stream import StreamingFetch
from optjob.storage.tensorstream.multipart import WrittenObject
from optjob.storage.tensorstream.reader import ReadAhead, RemoteShard


class _SourceShards:
    """The source weight files as streams, in index order; ``files`` fills in as each is read to the end."""

    def __init__(self, fetch: StreamingFetch, weights: list[str], weight_map: dict[str, str], source_dir: Path,
                 read_ahead: ReadAhead, clock: PhaseClock, cancel: CancelToken, events: EventSink,
                 resume: _Resume, farmed: FarmedShards | None = None) -> None:  # fmt: skip
        self.fetch, self.weights, self.weight_map = fetch, weights, weight_map
        self.farmed = farmed
        self.source_dir, self.read_ahead, self.clock, self.cancel, self.events = (
            source_dir, read_ahead, clock, cancel, events)  # fmt: skip
        self.resume = resume
        self.count = len(weights)
        self.files: list[FetchedFile] = []
        self.bytes_done = 0

    def __iter__(self) -> Iterator[RemoteShard | FinishedUnit]:
        total = sum(self.fetch.size(rel) for rel in self.weights) or 1
        for number, rel in enumerate(self.weights, 1):
            remote = self.fetch.remotes[rel]
            shard = RemoteShard(self.fetch.client, self.fetch.location.bucket, remote, read_ahead=self.read_ahead,
                                cancel=self.cancel, clock=self.clock, spool=self.source_dir / rel)  # fmt: skip
            try:
                check_shard_against_index(self.weight_map, rel, {span.name: span for span in shard.header.spans})
                finished = self.resume.reuse(rel)
                if finished is None and self.farmed is not None:
                    self.farmed.top_up(number - 1)
                    helper = self.farmed.take(rel)
                    if helper is not None and helper.unit is not None:
                        made = helper.unit.model_copy(update={"made_by": helper.node})
                        finished = self.resume.reuse(rel, made, by=f"a helper worker on {helper.node}")
                if finished is not None:  # the source is still read: its spool feeds the end-to-end check
                    for item in shard.tensors():
                        item.drain()
                yield finished if finished is not None else shard
                digest = shard.finish()
            finally:
                shard.close()
            self.files.append(FetchedFile(path=rel, size=remote.size, sha256=digest, key=remote.key,
                                          etag=remote.etag, verified=remote.sha256 is not None))  # fmt: skip
            self.bytes_done += remote.size
            self.events("download", "file", self.bytes_done / total,
                        f"{number}/{self.count} weight files, {self.bytes_done / MiB:.0f} of {total / MiB:.0f} MiB",
                        bytes_done=self.bytes_done, bytes_total=total)  # fmt: skip


class _Resume:
    """Finished units an earlier attempt of this job recorded, re-checked before they are reused."""

    def __init__(self, publisher: Publisher, progress: ProgressLog, out_dir: Path, read_ahead: ReadAhead,
                 clock: PhaseClock, cancel: CancelToken, events: EventSink) -> None:  # fmt: skip
        self.publisher, self.progress, self.out_dir = publisher, progress, out_dir
        self.read_ahead, self.clock, self.cancel, self.events = read_ahead, clock, cancel, events
        previous = publisher.previous
        self.units: dict[str, FinishedUnit] = {}
        if previous is not None and previous.fingerprint == progress.progress.fingerprint:
            self.units = {rel: unit.model_copy(update={"made_by": None}) for rel, unit in previous.units.items()}
            events("resume", "found", None, f"attempt {progress.progress.attempt}: an earlier attempt finished "
                   f"{len(self.units)} output file(s); each is re-checked (sha256) before it is reused")  # fmt: skip
        elif previous is not None and previous.units and previous.fingerprint:
            events("resume", "restart", None, "an earlier attempt left finished files, but the source, the plan or "
                   "the library versions changed since: starting clean", level="warning")  # fmt: skip
        elif previous is not None:
            events("resume", "restart", None, "an earlier attempt of this job left its output unfinished with "
                   "nothing to reuse: starting clean")  # fmt: skip
        self.reused: list[str] = []

    def reuse(self, rel: str, unit: FinishedUnit | None = None, *, by: str | None = None) -> FinishedUnit | None:
        """The unit for ``rel`` once its object is read back (into the local spool) and matches its
        recorded size and sha256; None when there is none or it does not match (then it is redone).
        ``unit`` and ``by``: a unit another worker of this attempt just made (not an earlier attempt's)."""
        unit = unit or self.units.get(rel)
        if unit is None:
            return None
        client, location = self.publisher.client, self.publisher.location
        try:
            head = client.head_object(Bucket=location.bucket, Key=location.child(rel).key)
            remote = RemoteFile(location.child(rel).key, rel, int(head["ContentLength"]), head["ETag"], unit.sha256)
            reader = RemoteShard(client, location.bucket, remote, read_ahead=self.read_ahead, cancel=self.cancel,
                                 clock=self.clock, spool=self.out_dir / rel)  # fmt: skip
            try:
                for item in reader.tensors():
                    item.drain()
                reader.finish()  # raises when the bytes do not match the recorded sha256
            finally:
                reader.close()
        except (JobFailed, KeyError, ValueError) as exc:
            self.events("resume", "redo", None, f"{rel}: not reused ({exc}); quantizing it again", level="warning")
            return None
        except Exception as exc:  # e.g. the object is gone
            self.events("resume", "redo", None, f"{rel}: not reused ({type(exc).__name__}); quantizing it again")
            return None
        written = WrittenObject(location.child(rel).key, unit.size, unit.sha256)
        self.publisher.record_streamed(rel, written, self.out_dir / rel)
        self.progress.record(unit)
        if by is None:
            self.reused.append(rel)
        self.events("resume", "reused", None,
                    f"{rel}: finished by {by or 'an earlier attempt'}, sha256 re-checked, reused")  # fmt: skip
        return unit


def run_tensor_streaming(
    plan: Plan,
    technique: TensorStreamingTechnique,
    *,
    job_arn: str,
    work_dir: Path,
    events: EventSink,
    cancel: CancelToken,
    storage: S3Settings | None,
    farm: ShardFarm | None = None,
) -> RunOutcome:
    """Fetch, run and publish a tensor at a time; raises JobFailed subclasses or JobCancelled.

    ``farm``: helper workers that make some of the output shards (``shard_farm``)."""
    stage = plan.stages[0]
    source_dir, out_dir = work_dir / "source", work_dir / f"stage-1-{stage.optimization_type.lower()}"
    out_dir.mkdir(parents=True, exist_ok=True)
    read_ahead, window, budget = streaming_settings()
    technique.import_libraries()  # so the memory check below sees their footprint
    memory = check_memory_limit(budget)
    events("download", "list", 0.0, f"listing {plan.source.s3_uri}")
    fetch = StreamingFetch(plan.source.s3_uri, source_dir, settings=storage, cancel=cancel)
    weights = weight_order(fetch)
    small = sorted(set(fetch.remotes) - set(weights))
    fetch.start(order=small, only=True)
    clock = PhaseClock()
    publisher = job_publisher(plan, job_arn, storage=storage, events=events, cancel=cancel)
    farmed: FarmedShards | None = None
    try:
        weight_map = open_source(plan, fetch, source_dir, small, weights, publisher)
        identity = fingerprint([(r.rel, r.etag, r.size) for r in fetch.remotes.values()], plan.model_dump(mode="json"))
        attempt = publisher.previous.attempt + 1 if publisher.previous is not None else 1
        progress = ProgressLog(publisher.client, publisher.location,
                               Progress(job_arn=job_arn, fingerprint=identity, attempt=attempt),
                               extra_args=sse_args(plan.output.kms_key_id))  # fmt: skip
        resume = _Resume(publisher, progress, out_dir, read_ahead, clock, cancel, events)
        if farm is not None:
            todo = [rel for rel in weights if rel not in resume.units]
            for rel in todo:
                publisher.reserve(rel)  # a helper may write it: a rollback removes it too
            farmed = FarmedShards(farm, todo, {rel: fetch.remotes[rel].etag for rel in todo}, events, cancel)
        shards = _SourceShards(fetch, weights, weight_map, source_dir, read_ahead, clock, cancel, events, resume,
                               farmed)  # fmt: skip
        open_output = open_shard_output(publisher, progress, out_dir, window, clock)

        ctx = stage_context(plan, stage, input_dir=source_dir, output_dir=out_dir, work_dir=work_dir, events=events,
                            cancel=cancel, clock=clock)  # fmt: skip
        events(stage.optimization_type, "start", 0.0, f"stage 1/1 via {stage.engine}, streaming tensor by tensor")
        result = technique.run_tensor_streaming(stage, ctx, shards, open_output)
        events(stage.optimization_type, "done", 1.0, "stage 1/1 finished")
        small_files = fetch.result()
        files = sorted([*small_files.files, *shards.files], key=lambda item: item.path)
        fetched = FetchedModel(
            source_uri=plan.source.s3_uri, path=source_dir, files=files, total_bytes=sum(f.size for f in files),
            etags={remote.key: remote.etag for remote in fetch.remotes.values()}, archive=False, from_cache=False,
            bytes_downloaded=small_files.bytes_downloaded + shards.bytes_done, dropped=fetch.dropped,
        )  # fmt: skip
        check_model_dir(source_dir, allow_pickle=os.environ.get(ALLOW_PICKLE_ENV) == "1")
        cancel.raise_if_cancelled()
        result.metrics.setdefault("streaming", {}).update(
            {"granularity": "tensor", "phases_s": clock.seconds(), "memory": memory,
             "read_ahead_mib": read_ahead.window // MiB, "upload_part_mib": window.part // MiB,
             "uploads_in_flight": window.in_flight, "attempt": attempt, "resumed_files": resume.reused})  # fmt: skip
        if farmed is not None:
            result.metrics["streaming"]["workers"] = farmed.figures()
        return publish_streamed(plan, job_arn, publisher, stage=stage, result=result, source_dir=source_dir,
                                out_dir=out_dir, fetched=fetched)  # fmt: skip
    except BaseException:
        if farmed is not None:
            farmed.stop()
        fetch.stop()
        publisher.rollback()
        raise
