"""Stream a ``.tar.gz`` object out of S3 and extract it safely while it downloads.

The archive is never stored whole: a resumable ranged reader feeds ``tarfile`` in stream mode,
and a dropped connection resumes from the byte it reached (pinned to the object's ETag so a
concurrent overwrite cannot splice two versions). Members are written by hand instead of with
``extractall``: only plain files and directories with relative, ``..``-free names are accepted,
and every link, device or duplicate is refused, because the archive's author chooses those names.
The archive's declared sizes are held to ``configs/limits.yaml`` (total bytes, member count, and
expansion ratio, so a bomb is refused on its headers) and only model files are written.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError
from urllib3.exceptions import HTTPError

from optjob.errors import InfrastructureError, InputError
from optjob.limits import limits
from optjob.runtime.cancel import CancelToken
from optjob.storage.inputs import is_model_file, safe_relative_path
from optjob.storage.s3 import MiB, S3Client, storage_error

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")
_CHUNK = MiB


class _ShortRead(Exception):
    """The server closed the body before the object's end: resume with a new ranged GET."""


class RangeReader(io.RawIOBase):
    """A read-only stream over one S3 object that reconnects with a Range request on errors."""

    def __init__(
        self,
        client: S3Client,
        bucket: str,
        key: str,
        *,
        etag: str,
        size: int,
        attempts: int,
        cancel: CancelToken,
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__()
        self._client, self._bucket, self._key = client, bucket, key
        self._etag, self._size, self._attempts = etag, size, max(1, attempts)
        self._cancel = cancel
        self._on_bytes = on_bytes
        self._body: object | None = None
        self.position = 0
        self.sha256 = hashlib.sha256()

    @property
    def size(self) -> int:
        return self._size

    @property
    def uri(self) -> str:
        return f"s3://{self._bucket}/{self._key}"

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        response = self._client.get_object(
            Bucket=self._bucket, Key=self._key, IfMatch=self._etag, Range=f"bytes={self.position}-"
        )
        self._body = response["Body"]

    def _drop(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            with contextlib.suppress(Exception):  # the connection is already broken
                body.close()  # type: ignore[attr-defined]

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        self._cancel.raise_if_cancelled()
        if self.position >= self._size:
            return 0
        failures = 0
        while True:
            try:
                if self._body is None:
                    self._open()
                data = self._body.read(min(len(buffer), _CHUNK))  # type: ignore[union-attr]
                if not data:
                    raise _ShortRead(f"the response ended after {self.position} of {self._size} bytes")
                break
            except ClientError as exc:  # an answer, not a broken connection: retrying will not help
                self._drop()
                raise storage_error(exc, "download", self.uri) from exc
            except (BotoCoreError, HTTPError, OSError, _ShortRead) as exc:
                self._drop()
                failures += 1
                if failures >= self._attempts:
                    raise InfrastructureError(
                        f"Cannot download {self.uri}: the connection failed {failures} times at byte "
                        f"{self.position} of {self._size} ({type(exc).__name__}: {exc})."
                    ) from exc
                if self._cancel.wait(min(0.2 * 2**failures, 5.0)):
                    self._cancel.raise_if_cancelled()
        size = len(data)
        buffer[:size] = data
        self.position += size
        self.sha256.update(data)
        if self._on_bytes is not None:
            self._on_bytes(size)
        return size

    def close(self) -> None:
        self._drop()
        super().close()


def _write_member(source: io.BufferedReader, target: Path, rel: str, cancel: CancelToken) -> int:
    try:
        handle = target.open("xb")  # exclusive: a duplicate name must not overwrite a checked file
    except FileExistsError as exc:
        raise InputError(f"The archive holds {rel} twice. Re-create the archive without duplicates.") from exc
    written = 0
    with handle:
        while chunk := source.read(_CHUNK):
            cancel.raise_if_cancelled()
            handle.write(chunk)
            written += len(chunk)
    return written


class _Budget:
    """What the archive has declared so far, against ``configs/limits.yaml`` ``archive``.

    Tar headers give each member's size before its bytes, so a member that would pass a limit is
    refused before it is decompressed or written: a bomb costs its headers, not its contents."""

    def __init__(self, uri: str, compressed_bytes: int) -> None:
        rules = limits().archive
        self.uri, self.compressed = uri, max(compressed_bytes, 1)
        self.max_total, self.max_files = int(rules.max_total_gib * 2**30), rules.max_files
        self.max_ratio, self.floor = rules.max_ratio, int(rules.ratio_floor_mib * MiB)
        self.total = self.members = 0

    def admit(self, name: str, size: int) -> None:
        self.total += size
        self.members += 1
        fix = "Upload the model directory as a prefix, or an archive of only the model's files."
        if self.members > self.max_files:
            raise InputError(f"{self.uri} holds more than {self.max_files} members (configs/limits.yaml). {fix}")
        if self.total > self.max_total:
            raise InputError(
                f"{self.uri} declares more than {self.max_total // 2**30} GiB of files (at member {name[:200]!r}, "
                f"{self.total} bytes in all). {fix}"
            )
        ratio = self.total / self.compressed
        if self.total > self.floor and ratio > self.max_ratio:
            raise InputError(
                f"{self.uri} expands to {self.total} bytes from {self.compressed} compressed (ratio {ratio:.0f}:1 "
                f"at member {name[:200]!r}, the limit is {self.max_ratio:g}:1): it is refused as a decompression "
                f"bomb. {fix}"
            )


def extract_tar_stream(
    reader: RangeReader, dest: Path, cancel: CancelToken, *, dropped: list[str] | None = None
) -> list[str]:
    """Extract the gzip'd tar ``reader`` yields into ``dest``; returns the files written.

    Only model files (``inputs.is_model_file``) are written; the others are named in ``dropped``.
    Every member counts against the archive limits, written or not. Raises InputError for an
    unsafe member, a corrupt archive or one over the limits; the caller removes ``dest``.
    """
    buffered = io.BufferedReader(reader, buffer_size=_CHUNK)
    files: list[str] = []
    what = f"Archive member of {reader.uri}"
    budget = _Budget(reader.uri, reader.size)
    try:
        with tarfile.open(fileobj=buffered, mode="r|gz") as archive:
            for member in archive:
                cancel.raise_if_cancelled()
                rel = safe_relative_path(member.name, what=what)
                budget.admit(member.name, max(member.size, 0))
                if member.issym() or member.islnk():
                    kind = "symbolic link" if member.issym() else "hard link"
                    raise InputError(
                        f"{what} {member.name!r} is a {kind} (to {member.linkname!r}); links are refused "
                        "because they can point outside the model. Archive the real files instead."
                    )
                if member.isdir():
                    (dest / rel).mkdir(parents=True, exist_ok=True)
                    continue
                if not member.isfile():
                    raise InputError(
                        f"{what} {member.name!r} is a device, FIFO or other special file; only regular "
                        "files and directories are accepted. Re-create the archive without it."
                    )
                if not rel.parts:
                    raise InputError(f"{what} {member.name!r} is a file without a name.")
                if not is_model_file(rel.as_posix()):
                    if dropped is not None:
                        dropped.append(rel.as_posix())
                    continue  # tarfile skips its bytes when the next member is read
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                source = archive.extractfile(member)
                assert source is not None  # regular files always have a data stream
                _write_member(source, target, rel.as_posix(), cancel)  # type: ignore[arg-type]
                os.chmod(target, 0o644)
                files.append(rel.as_posix())
        # Drain padding after the end-of-archive blocks so size and sha256 cover the whole object.
        while buffered.read(_CHUNK):
            pass
    except (tarfile.TarError, zlib.error, EOFError, FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
        raise InputError(
            f"{reader.uri} is not a valid .tar.gz archive ({type(exc).__name__}: {exc}). Upload a gzip "
            "-compressed tar of the model directory, or the uncompressed directory as a prefix."
        ) from exc
    return files


def is_archive_key(key: str) -> bool:
    return key.lower().endswith(ARCHIVE_SUFFIXES)
