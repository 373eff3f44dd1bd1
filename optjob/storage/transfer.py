"""Run a batch of parallel S3 transfers with progress events and cancellation.

s3transfer does the parallel, multipart, retried work on its own threads; this module owns the
waiting: it reports bytes moved as job events from the caller's thread (event sinks need not be
thread-safe), checks the cancel token between polls, and on cancel or the first failure shuts the
manager down cancelling the rest, so in-flight multipart uploads are aborted by s3transfer itself.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from s3transfer.manager import TransferManager
from s3transfer.subscribers import BaseSubscriber

from optjob.errors import JobCancelled
from optjob.runtime.cancel import CancelToken
from optjob.runtime.events import EventSink
from optjob.storage.s3 import MiB, S3Client, S3Settings, storage_error, transfer_config

_POLL_S = 0.05
_EVENT_EVERY_S = 0.5


@dataclass(frozen=True)
class TransferTask:
    """One file to move between ``path`` and ``bucket/key``; ``size`` is known up front."""

    bucket: str
    key: str
    path: Path
    size: int
    extra_args: dict[str, Any] = field(default_factory=dict)
    etag: str | None = None
    """For downloads: s3transfer then sends ``IfMatch`` so a concurrent overwrite fails the GET."""

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


class _Progress(BaseSubscriber):
    """Counts bytes from s3transfer's threads; gives it size and ETag so it skips a HeadObject."""

    def __init__(self, task: TransferTask, counter: _Counter) -> None:
        self._task = task
        self._counter = counter

    def on_queued(self, future: Any, **kwargs: Any) -> None:
        future.meta.provide_transfer_size(self._task.size)
        if self._task.etag is not None:
            future.meta.provide_object_etag(self._task.etag)

    def on_progress(self, future: Any, bytes_transferred: int, **kwargs: Any) -> None:
        self._counter.add(bytes_transferred)


class _Counter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def add(self, amount: int) -> None:
        with self._lock:
            self.value += amount


def run_transfers(
    client: S3Client,
    settings: S3Settings,
    tasks: Sequence[TransferTask],
    *,
    direction: Literal["download", "upload"],
    events: EventSink,
    cancel: CancelToken,
    stage: str,
) -> int:
    """Move every task; returns the bytes moved.

    Raises JobCancelled when the token fires, or the translated storage error of the first failure;
    either way the remaining transfers are cancelled before this returns.
    """
    total = sum(task.size for task in tasks)
    counter = _Counter()
    pending: dict[Any, TransferTask] = {}
    # Leaving the manager's context on an exception (a failure, JobCancelled) cancels what is in
    # flight, and s3transfer aborts those multipart uploads. (Its shutdown(cancel=True) is broken
    # in s3transfer 0.19: it passes the message where the exception type belongs.)
    with TransferManager(client, transfer_config(settings, client)) as manager:
        for task in tasks:
            cancel.raise_if_cancelled()
            subscribers = [_Progress(task, counter)]
            if direction == "download":
                future = manager.download(task.bucket, task.key, str(task.path), task.extra_args, subscribers)
            else:
                future = manager.upload(str(task.path), task.bucket, task.key, task.extra_args, subscribers)
            pending[future] = task
        last_event = 0.0
        while pending:
            if cancel.wait(_POLL_S):
                raise JobCancelled(cancel.reason or "stopped")
            for future in [f for f in pending if f.done()]:
                task = pending.pop(future)
                try:
                    future.result()
                except Exception as exc:
                    raise storage_error(exc, direction, task.uri) from exc
            now = time.monotonic()
            if now - last_event >= _EVENT_EVERY_S or not pending:
                last_event = now
                done = counter.value
                events(
                    stage,
                    direction,
                    done / total if total else 1.0,
                    f"{len(tasks) - len(pending)}/{len(tasks)} files, {done / MiB:.1f} of {total / MiB:.1f} MiB",
                    bytes_done=done,
                    bytes_total=total,
                )
    return counter.value
