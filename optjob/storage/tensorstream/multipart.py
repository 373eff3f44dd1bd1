"""Write one S3 object front to back as a multipart upload whose parts are sent as they fill.

A producer appends bytes; every ``part`` bytes become an UploadPart sent by a small thread pool,
with at most ``in_flight`` parts outstanding, so memory is bounded by ``(in_flight + 1) * part``
whatever the object's size. When the producer is faster than the network it blocks (time charged to
``wait_upload``): that is the back-pressure that keeps memory flat. The object's sha256 (and an
optional local copy, the spool) come from the same bytes on the way, on a sidecar thread.

The object exists only after ``close`` completes the upload; ``abort`` (any failure, a Stop) aborts
it, so S3 never holds a partial object under the key. An object smaller than one part is sent with
a single PutObject at ``close``.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from optjob.runtime.cancel import CancelToken
from optjob.runtime.phases import PhaseClock
from optjob.storage.s3 import S3Client, storage_error
from optjob.storage.tensorstream.sidecar import Sidecar

MiB = 1 << 20
_MIN_PART = 5 * MiB  # S3's minimum for every part but the last
_MAX_PARTS = 10_000
_WAIT_POLL_S = 0.1


@dataclass(frozen=True)
class UploadWindow:
    part: int = 8 * MiB
    in_flight: int = 2

    def part_size_for(self, expected_bytes: int) -> int:
        """The part size, raised when ``expected_bytes`` would need more parts than S3 allows."""
        need = -(-expected_bytes // (_MAX_PARTS - 1))
        return max(self.part, _MIN_PART, need)


@dataclass(frozen=True)
class WrittenObject:
    key: str
    size: int
    sha256: str


class MultipartObjectWriter:
    def __init__(
        self,
        client: S3Client,
        bucket: str,
        key: str,
        *,
        expected_bytes: int,
        window: UploadWindow | None = None,
        extra_args: dict[str, Any] | None = None,
        cancel: CancelToken | None = None,
        clock: PhaseClock | None = None,
        spool: Path | None = None,
    ) -> None:
        self.client, self.bucket, self.key = client, bucket, key
        self.uri = f"s3://{bucket}/{key}"
        self.window = window or UploadWindow()
        self.part_size = self.window.part_size_for(expected_bytes)
        self.extra_args = dict(extra_args or {})
        self.cancel = cancel or CancelToken()
        self.clock = clock or PhaseClock()
        self._sha = hashlib.sha256()
        self._sidecar = Sidecar(self.clock, self.cancel)
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._in_flight: deque[tuple[int, Future[str]]] = deque()
        self._parts: list[dict[str, Any]] = []
        self._spool_path = spool
        self._spool: BinaryIO | None = None
        if spool is not None:
            spool.parent.mkdir(parents=True, exist_ok=True)
            self._spool = self._partial_spool().open("wb")
        self.size = 0
        self.closed = False

    def _partial_spool(self) -> Path:
        assert self._spool_path is not None
        return self._spool_path.with_name(self._spool_path.name + ".partial")

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        self._sidecar.submit("hash", self._sha.update, view)
        if self._spool is not None:
            self._sidecar.submit("spool", self._spool.write, view)
        self.size += len(view)
        while len(view):
            room = self.part_size - len(self._buffer)
            self._buffer += view[:room]
            view = view[room:]
            if len(self._buffer) == self.part_size:
                self._send(bytes(self._buffer))
                self._buffer = bytearray()

    def _send(self, body: bytes) -> None:
        if self._upload_id is None:
            try:
                created = self.client.create_multipart_upload(Bucket=self.bucket, Key=self.key, **self.extra_args)
            except Exception as exc:
                raise storage_error(exc, "upload", self.uri) from exc
            self._upload_id = created["UploadId"]
            self._pool = ThreadPoolExecutor(max_workers=self.window.in_flight, thread_name_prefix="optjob-part")
        while len(self._in_flight) >= self.window.in_flight:
            self._collect_oldest()
        number = len(self._parts) + len(self._in_flight) + 1
        assert self._pool is not None
        self._in_flight.append((number, self._pool.submit(self._upload_part, number, body)))

    def _upload_part(self, number: int, body: bytes) -> str:
        response = self.client.upload_part(
            Bucket=self.bucket, Key=self.key, UploadId=self._upload_id, PartNumber=number, Body=body
        )
        return response["ETag"]

    def _collect_oldest(self) -> None:
        number, future = self._in_flight.popleft()
        with self.clock.phase("wait_upload"):
            while True:
                self.cancel.raise_if_cancelled()
                try:
                    etag = future.result(timeout=_WAIT_POLL_S)
                    break
                except TimeoutError:
                    continue
                except Exception as exc:
                    raise storage_error(exc, "upload", self.uri) from exc
        self._parts.append({"PartNumber": number, "ETag": etag})

    def close(self) -> WrittenObject:
        """Send what is buffered, wait for every part, complete the upload; the object now exists."""
        self.cancel.raise_if_cancelled()
        self._sidecar.drain()
        try:
            if self._upload_id is None:
                with self.clock.phase("wait_upload"):
                    self.client.put_object(
                        Bucket=self.bucket, Key=self.key, Body=bytes(self._buffer), **self.extra_args
                    )
            else:
                if self._buffer:
                    self._send(bytes(self._buffer))
                while self._in_flight:
                    self._collect_oldest()
                with self.clock.phase("wait_upload"):
                    self.client.complete_multipart_upload(
                        Bucket=self.bucket, Key=self.key, UploadId=self._upload_id,
                        MultipartUpload={"Parts": sorted(self._parts, key=lambda part: part["PartNumber"])},
                    )  # fmt: skip
        except Exception as exc:
            raise storage_error(exc, "upload", self.uri) from exc
        self._buffer = bytearray()
        self.closed = True
        self._shutdown()
        if self._spool is not None and self._spool_path is not None:
            self._spool.close()
            self._spool = None
            self._partial_spool().replace(self._spool_path)
        return WrittenObject(self.key, self.size, self._sha.hexdigest())

    def abort(self) -> None:
        """Abandon the object: parts in flight are dropped and the multipart upload is aborted."""
        for _, future in self._in_flight:
            future.cancel()
        self._in_flight.clear()
        self._shutdown()
        if self._upload_id is not None and not self.closed:
            # Best effort: the publisher's rollback lists and aborts whatever is left open.
            with contextlib.suppress(Exception):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self._upload_id)
        if self._spool is not None:
            self._spool.close()
            self._spool = None
            self._partial_spool().unlink(missing_ok=True)

    def _shutdown(self) -> None:
        self._sidecar.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
