"""The output side of a tensor-streamed job: each output shard written as a planned multipart upload
(spooled to local disk for the checks that need whole layers) and recorded as a finished unit once
complete; and the stream's settings and memory pre-flight. Shared by the job's runner and by a
helper worker that makes some of its shards."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from optjob.config_files import load_config
from optjob.errors import InfrastructureError
from optjob.runtime.memory_limit import cgroup_headroom_bytes
from optjob.runtime.phases import PhaseClock
from optjob.runtime.usage import rss_mib
from optjob.storage.progress import FinishedUnit
from optjob.storage.publish import Publisher
from optjob.storage.s3 import MiB
from optjob.storage.tensorstream.header import ShardHeader
from optjob.storage.tensorstream.multipart import MultipartObjectWriter, UploadWindow
from optjob.storage.tensorstream.reader import ReadAhead
from optjob.storage.tensorstream.writer import PlannedShardWriter


def streaming_settings() -> tuple[ReadAhead, UploadWindow, int]:
    """Read-ahead, upload window and memory budget (MiB) from ``configs/streaming.yaml``."""
    cfg = load_config("streaming.yaml")
    read, up = cfg["read_ahead"], cfg["upload"]
    read_ahead = ReadAhead(chunk=int(read["chunk_mib"]) * MiB, window=int(read["window_mib"]) * MiB,
                           workers=int(read["workers"]))  # fmt: skip
    window = UploadWindow(part=int(up["part_mib"]) * MiB, in_flight=int(up["in_flight"]))
    return read_ahead, window, int(cfg["memory_budget_mib"])


def check_memory_limit(budget_mib: int) -> dict[str, float | None]:
    """Fail before any work when the worker's cgroup limit leaves less than the streaming budget
    (the cgroup's anonymous memory counts: a supervisor process beside the worker shares the limit)."""
    found = cgroup_headroom_bytes()
    used = rss_mib()
    if found is not None and found[1] / MiB < budget_mib:
        limit, headroom = found[0] / MiB, found[1] / MiB
        raise InfrastructureError(
            f"Out of memory before starting: the worker's memory limit is {limit:.0f} MiB, {limit - headroom:.0f} "
            f"MiB of it is already in use (this worker's libraries: {used:.0f} MiB), and streaming quantization "
            f"needs {budget_mib} MiB more (memory_budget_mib in configs/streaming.yaml). Give the worker at least "
            f"{limit - headroom + budget_mib:.0f} MiB."
        )
    return {"limit_mib": round(found[0] / MiB, 1) if found else None, "rss_before_mib": round(used, 1),
            "headroom_mib": round(found[1] / MiB, 1) if found else None, "budget_mib": budget_mib}  # fmt: skip


class UnitRecorder(Protocol):
    def record(self, unit: FinishedUnit) -> None: ...


class ShardOutput:
    """An output shard being streamed to S3 (and spooled locally); final once ``close`` returns, and
    then recorded as a finished unit, so an attempt that dies later does not redo it."""

    def __init__(self, rel: str, header: ShardHeader, upload: MultipartObjectWriter, publisher: Publisher,
                 spool: Path, progress: UnitRecorder) -> None:  # fmt: skip
        self.rel, self.upload, self.publisher, self.spool, self.progress = rel, upload, publisher, spool, progress
        self.writer = PlannedShardWriter(header, upload, what=f"output {rel}")

    def close(self, record: dict[str, Any] | None = None) -> None:
        """``record``: the stage's account of this file, handed back to it if a later attempt resumes."""
        self.writer.check_complete()
        written = self.upload.close()
        self.publisher.record_streamed(self.rel, written, self.spool)
        self.progress.record(FinishedUnit(path=self.rel, size=written.size, sha256=written.sha256, stage=record or {}))

    def abort(self) -> None:
        self.upload.abort()


def open_shard_output(publisher: Publisher, progress: UnitRecorder, out_dir: Path, window: UploadWindow,
                      clock: PhaseClock) -> Callable[[str, ShardHeader], ShardOutput]:  # fmt: skip
    """The ``open_output`` a stage gets: each output file streamed to S3, spooled, recorded when closed."""

    def open_output(rel: str, header: ShardHeader) -> ShardOutput:
        spool = out_dir / rel
        upload = publisher.stream_object(rel, expected_bytes=header.file_bytes, window=window, clock=clock,
                                         spool=spool)  # fmt: skip
        return ShardOutput(rel, header, upload, publisher, spool, progress)

    return open_output
