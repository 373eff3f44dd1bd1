"""Read a safetensors object from S3 tensor by tensor, with ranged GETs and a bounded read-ahead.

One ranged GET fetches the header (and whatever data follows it in the first request); the rest
of the object is fetched in fixed-size chunks by a few threads, at most ``window`` bytes ahead of
the consumer, so memory stays at the window whatever the shard size, and a 5 GB shard starts
being worked on after its first chunk instead of after its last byte. Every GET carries
``If-Match`` with the ETag the object was listed with: a concurrent overwrite fails the job
instead of mixing two versions.

The consumer sees tensors in data order, each as a sequence of memoryviews over the chunk bytes
(so a tensor that passes through unchanged is never assembled), and may assemble one when it needs
it whole. On the way the object's sha256 is computed from the same bytes and compared, once the
last byte is in, with the sha256 the source records (if any); the bytes can also be written to a
local spool file for the checks that run after the stream (the end-to-end replay).
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from optjob.errors import InputError
from optjob.runtime.cancel import CancelToken
from optjob.runtime.phases import PhaseClock
from optjob.storage.s3 import S3Client, storage_error
from optjob.storage.source import RemoteFile
from optjob.storage.tensorstream.header import ShardHeader, TensorSpan, header_length, parse_header
from optjob.storage.tensorstream.sidecar import Sidecar

_FIRST_GET = 1 << 20  # headers are almost always smaller; a larger one costs one more request
_WAIT_POLL_S = 0.1
_GET_ATTEMPTS = 3
MiB = 1 << 20


@dataclass(frozen=True)
class ReadAhead:
    """How far ahead of the consumer the reader fetches: ``window`` bytes in ``chunk``-byte GETs."""

    chunk: int = 8 * MiB
    window: int = 32 * MiB
    workers: int = 4

    @property
    def chunks_ahead(self) -> int:
        return max(1, self.window // self.chunk)


def _get_range(client: S3Client, bucket: str, remote: RemoteFile, first: int, last: int) -> bytes:
    """Bytes ``first..last`` (inclusive); a failed body read is retried, a replaced object is not."""
    uri = f"s3://{bucket}/{remote.key}"
    for attempt in range(1, _GET_ATTEMPTS + 1):
        try:
            response = client.get_object(
                Bucket=bucket, Key=remote.key, Range=f"bytes={first}-{last}", IfMatch=remote.etag
            )
            data = response["Body"].read()
        except Exception as exc:
            status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
            if attempt == _GET_ATTEMPTS or (status is not None and 400 <= status < 500):
                raise storage_error(exc, "download", uri) from exc
            time.sleep(0.2 * attempt)
            continue
        if len(data) != last - first + 1:
            if attempt == _GET_ATTEMPTS:
                raise InputError(f"{uri}: asked for bytes {first}-{last}, got {len(data)}; the object changed size")
            continue
        return data
    raise AssertionError("unreachable")


class RemoteShard:
    """One safetensors object being read. ``header`` is available after construction."""

    def __init__(
        self,
        client: S3Client,
        bucket: str,
        remote: RemoteFile,
        *,
        read_ahead: ReadAhead | None = None,
        cancel: CancelToken | None = None,
        clock: PhaseClock | None = None,
        spool: Path | None = None,
    ) -> None:
        self.client, self.bucket, self.remote = client, bucket, remote
        self.rel = remote.rel
        self.read_ahead = read_ahead or ReadAhead()
        self.cancel = cancel or CancelToken()
        self.clock = clock or PhaseClock()
        self.what = f"s3://{bucket}/{remote.key}"
        self._sha = hashlib.sha256()
        self._sidecar = Sidecar(self.clock, self.cancel)
        self._spool_path = spool
        self._spool: BinaryIO | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[Future[bytes]] = deque()
        self._next_offset = 0  # next byte of the object not yet requested
        self._buffer = memoryview(b"")  # received, not yet consumed; starts at self._position
        self._position = 0
        self.bytes_read = 0
        first = _get_range(client, bucket, remote, 0, min(remote.size, _FIRST_GET) - 1) if remote.size else b""
        length = header_length(first, what=self.what, file_bytes=remote.size)
        if 8 + length > len(first):
            first += _get_range(client, bucket, remote, len(first), 8 + length - 1)
        self.header: ShardHeader = parse_header(first, what=self.what, file_bytes=remote.size)
        self._next_offset = len(first)
        self._accept(first)

    # -- byte stream ---------------------------------------------------------------------------------
    def _accept(self, data: bytes) -> None:
        self._sidecar.submit("hash", self._sha.update, data)
        if self._spool_path is not None:
            if self._spool is None:
                self._spool_path.parent.mkdir(parents=True, exist_ok=True)
                self._spool = self._partial_spool().open("wb")
            self._sidecar.submit("spool", self._spool.write, data)
        self.bytes_read += len(data)
        rest = self._buffer
        self._buffer = memoryview(bytes(rest) + data) if len(rest) else memoryview(data)

    def _partial_spool(self) -> Path:
        assert self._spool_path is not None
        return self._spool_path.with_name(self._spool_path.name + ".partial")

    def _fill_requests(self) -> None:
        ahead = self.read_ahead
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=ahead.workers, thread_name_prefix="optjob-range")
        while len(self._pending) < ahead.chunks_ahead and self._next_offset < self.remote.size:
            first = self._next_offset
            last = min(first + ahead.chunk, self.remote.size) - 1
            self._pending.append(self._pool.submit(_get_range, self.client, self.bucket, self.remote, first, last))
            self._next_offset = last + 1

    def _more(self) -> None:
        """Wait for the next chunk in order (time charged to ``wait_download``)."""
        self._fill_requests()
        if not self._pending:
            raise InputError(f"{self.what} ended before its last tensor; the object is truncated. Re-upload it.")
        future = self._pending.popleft()
        with self.clock.phase("wait_download"):
            while True:
                self.cancel.raise_if_cancelled()
                try:
                    data = future.result(timeout=_WAIT_POLL_S)
                    break
                except TimeoutError:
                    continue
        self._fill_requests()
        self._accept(data)

    def _take(self, count: int) -> Iterator[memoryview]:
        """The next ``count`` bytes of the object, as they arrive."""
        while count:
            if not len(self._buffer):
                self._more()
            piece = self._buffer[:count]
            self._buffer = self._buffer[len(piece) :]
            self._position += len(piece)
            count -= len(piece)
            yield piece

    def _skip_to(self, offset: int) -> None:
        for _ in self._take(offset - self._position):
            pass

    # -- tensors -------------------------------------------------------------------------------------
    def tensors(self) -> Iterator[TensorBytes]:
        """Each tensor in data order. Consume one fully (or not at all) before asking for the next."""
        self._skip_to(self.header.data_start)
        for span in self.header.spans:
            self._skip_to(self.header.data_start + span.begin)
            item = TensorBytes(span, self._take(span.nbytes))
            yield item
            item.drain()

    def finish(self) -> str:
        """Read what is left after the last tensor, check size and recorded sha256; the hex digest."""
        self._skip_to(self.remote.size)
        self._sidecar.drain()
        digest = self._sha.hexdigest()
        if self.bytes_read != self.remote.size:
            raise InputError(f"{self.what}: read {self.bytes_read} of {self.remote.size} bytes; retry the job")
        if self.remote.sha256 is not None and digest != self.remote.sha256:
            raise InputError(
                f"{self.what} does not match its recorded sha256 ({self.remote.sha256[:12]}..., content "
                f"{digest[:12]}...): the object is corrupt or was replaced without updating its checksum. Re-upload it."
            )
        if self._spool is not None and self._spool_path is not None:
            self._spool.close()
            self._spool = None
            self._partial_spool().replace(self._spool_path)
        self.close()
        return digest

    def close(self) -> None:
        """Stop outstanding GETs and drop a partial spool file (idempotent)."""
        self._sidecar.close()
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._spool is not None:
            self._spool.close()
            self._spool = None
            self._partial_spool().unlink(missing_ok=True)


class TensorBytes:
    """One tensor's bytes as they arrive: iterate ``pieces`` to stream them, or call ``tensor()``."""

    def __init__(self, span: TensorSpan, pieces: Iterator[memoryview]) -> None:
        self.span = span
        self._pieces = pieces
        self._used = False

    @property
    def name(self) -> str:
        return self.span.name

    def pieces(self) -> Iterator[memoryview]:
        if self._used:
            raise RuntimeError(f"{self.span.name}: its bytes were already consumed")
        self._used = True
        return self._pieces

    def tensor(self) -> torch.Tensor:
        """The whole tensor, in a buffer of its own (the chunks it came in are released)."""
        from optjob.storage.safetensors_io import torch_dtype

        out = torch.empty(self.span.nbytes, dtype=torch.uint8)
        view = memoryview(out.numpy()).cast("B")
        at = 0
        for piece in self.pieces():
            view[at : at + len(piece)] = piece
            at += len(piece)
        return out.view(torch_dtype(self.span.dtype)).reshape(self.span.shape)

    def blocks(self, block_bytes: int) -> Iterator[torch.Tensor]:
        """The tensor's bytes in consecutive blocks of ``block_bytes`` (the last may be shorter), each
        a fresh flat tensor of the tensor's dtype: a block of rows when ``block_bytes`` is a multiple
        of a row. Nothing but the block in hand is kept, so any tensor streams in bounded memory."""
        from optjob.storage.safetensors_io import torch_dtype

        dtype = torch_dtype(self.span.dtype)
        left, pieces = self.span.nbytes, self.pieces()
        pending = memoryview(b"")
        while left:
            size = min(block_bytes, left)
            out = torch.empty(size, dtype=torch.uint8)
            view = memoryview(out.numpy()).cast("B")
            at = 0
            while at < size:
                if not len(pending):
                    pending = next(pieces)
                take = pending[: size - at]
                view[at : at + len(take)] = take
                at += len(take)
                pending = pending[len(take) :]
            left -= size
            yield out.view(dtype)
        for _ in pieces:  # the generator finishes its bookkeeping
            pass

    def drain(self) -> None:
        if not self._used:
            self._used = True
        for _ in self._pieces:
            pass
