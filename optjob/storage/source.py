"""Fetch ModelSource.S3.S3Uri into a local directory: a prefix or a single ``.tar.gz``.

A prefix holding an uncompressed Hugging Face directory is the SageMaker norm; its objects are
downloaded in parallel (multipart, retried, each pinned to the ETag it was listed with so a
concurrent overwrite fails instead of mixing versions). A ``.tar.gz`` object is extracted while it
streams. Integrity: every file's size is checked, and its sha256 is compared with whatever the
source records (our ``x-amz-meta-sha256``, S3's full-object ChecksumSHA256, or the
``optjob-manifest.json`` of a prefix another job published). Downloads land in a staging
directory that only becomes the result once complete, so a failed or stopped fetch leaves nothing
that looks like a model. With ``settings.cache_dir``, results are cached under a key made of the
URI and the ETags: a re-run of an unchanged source downloads nothing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict

from optjob.errors import InfrastructureError, InputError, JobCancelled
from optjob.runtime.cancel import CancelToken
from optjob.runtime.events import NULL_SINK, EventSink
from optjob.storage.archive import RangeReader, extract_tar_stream, is_archive_key
from optjob.storage.hashing import sha256_files
from optjob.storage.inputs import is_model_file, safe_relative_path
from optjob.storage.layout import MANIFEST_NAME, RESERVED_NAMES, SHA256_METADATA
from optjob.storage.s3 import MiB, S3Client, S3Settings, make_client, storage_error
from optjob.storage.transfer import TransferTask, run_transfers
from optjob.storage.uri import S3Location, parse_s3_uri

STAGE = "download"
_CACHE_FORMAT = 2  # 2: only model files are cached (entries of 1 may hold others)


class FetchedFile(BaseModel):
    """One local file: ``path`` is relative to the fetch directory; ``verified`` when a recorded
    sha256 was available and matched (otherwise ``sha256`` is what we computed, for provenance)."""

    model_config = ConfigDict(frozen=True)

    path: str
    size: int
    sha256: str
    key: str | None = None
    etag: str | None = None
    verified: bool = False


class FetchedModel(BaseModel):
    """What ``fetch_model`` produced; ``path`` is the model root (for an archive with a single
    top-level directory, that directory). ``etags`` maps each source key to its ETag."""

    model_config = ConfigDict(frozen=True)

    source_uri: str
    path: Path
    files: list[FetchedFile]
    total_bytes: int
    etags: dict[str, str]
    archive: bool
    from_cache: bool
    bytes_downloaded: int
    dropped: list[str] = []
    """Source files that are not model files (``inputs.is_model_file``), left behind."""


@dataclass(frozen=True)
class RemoteFile:
    key: str
    rel: str
    size: int
    etag: str
    sha256: str | None  # recorded by the source, when it records one


def _recorded_sha256(head: dict[str, Any]) -> str | None:
    value = (head.get("Metadata") or {}).get(SHA256_METADATA)
    if isinstance(value, str) and len(value) == 64:
        return value.lower()
    checksum = head.get("ChecksumSHA256")
    # A multipart object's checksum is a checksum of part checksums ("...-N"), not of the object.
    if isinstance(checksum, str) and "-" not in checksum and head.get("ChecksumType") != "COMPOSITE":
        try:
            return base64.b64decode(checksum, validate=True).hex()
        except (binascii.Error, ValueError):
            return None
    return None


def _head(client: S3Client, bucket: str, key: str) -> dict[str, Any]:
    try:
        return client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    except Exception as exc:
        raise storage_error(exc, "read", f"s3://{bucket}/{key}") from exc


def _source_manifest(client: S3Client, location: S3Location) -> dict[str, tuple[int, str]]:
    """size and sha256 per file from a published prefix's manifest (empty if it has none)."""
    key = location.prefix + MANIFEST_NAME
    try:
        body = client.get_object(Bucket=location.bucket, Key=key)["Body"].read()
        manifest = json.loads(body)
        return {str(f["path"]): (int(f["size"]), str(f["sha256"]).lower()) for f in manifest["files"]}
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(
            f"s3://{location.bucket}/{key} is not a valid optjob manifest ({exc}); the prefix was modified "
            "after it was published. Re-publish it or remove the manifest."
        ) from exc
    except Exception as exc:
        raise storage_error(exc, "read", f"s3://{location.bucket}/{key}") from exc


def list_remote_files(
    client: S3Client,
    location: S3Location,
    settings: S3Settings,
    cancel: CancelToken,
    *,
    dropped: list[str] | None = None,
) -> list[RemoteFile]:
    """The model files under ``location`` (``inputs.is_model_file``); others are named in ``dropped``
    and never downloaded."""
    prefix = location.prefix
    keys: list[tuple[str, str]] = []
    has_manifest = False
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=prefix):
            cancel.raise_if_cancelled()
            for item in page.get("Contents", []):
                name = item["Key"][len(prefix) :]
                if not name or name.endswith("/"):
                    continue  # "directory" marker objects made by consoles and some tools
                if name in RESERVED_NAMES:
                    has_manifest = has_manifest or name == MANIFEST_NAME
                    continue
                rel = safe_relative_path(name, what=f"S3 object under {location.uri}")
                keys.append((item["Key"], rel.as_posix()))
    except (InputError, JobCancelled):
        raise
    except Exception as exc:
        raise storage_error(exc, "list", location.uri) from exc
    names = {rel for _, rel in keys}
    for _, rel in keys:
        parent = PurePosixPath(rel).parent
        while parent.parts:
            if parent.as_posix() in names:
                raise InputError(
                    f"Under {location.uri}, {parent.as_posix()} is both a file and the folder of {rel}; "
                    "a directory cannot hold both. Remove one of them."
                )
            parent = parent.parent
    if dropped is not None:  # a layout that is unsafe is refused above even where its files are not kept
        dropped.extend(rel for _, rel in keys if not is_model_file(rel))
    keys = [(key, rel) for key, rel in keys if is_model_file(rel)]
    if not keys:
        raise InputError(
            f"No objects under {location.uri}. ModelSource.S3.S3Uri must be a prefix holding the model "
            "directory (config.json, *.safetensors, tokenizer files) or a single .tar.gz object."
        )
    with ThreadPoolExecutor(max_workers=min(settings.max_concurrency, len(keys))) as pool:
        heads = list(pool.map(lambda pair: _head(client, location.bucket, pair[0]), keys))
    recorded = _source_manifest(client, location) if has_manifest else {}
    remotes = []
    for (key, rel), head in zip(keys, heads, strict=True):
        remote = RemoteFile(key, rel, int(head["ContentLength"]), head["ETag"], _recorded_sha256(head))
        if rel in recorded:
            size, sha = recorded.pop(rel)
            if size != remote.size or (remote.sha256 and remote.sha256 != sha):
                raise InputError(
                    f"s3://{location.bucket}/{key} is {remote.size} bytes but the prefix's {MANIFEST_NAME} "
                    f"records {size}: it was modified after publishing. Re-publish the model."
                )
            remote = RemoteFile(key, rel, remote.size, remote.etag, sha)
        remotes.append(remote)
    if recorded:
        raise InputError(
            f"{location.uri}{MANIFEST_NAME} lists {sorted(recorded)[0]}, which is missing from the prefix: "
            "the published model is incomplete. Re-publish it."
        )
    return remotes


def _cache_key(location: S3Location, remotes: list[RemoteFile]) -> str:
    identity = {"uri": location.uri, "objects": sorted((r.key, r.etag, r.size) for r in remotes)}
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:40]


def _model_root(directory: Path) -> Path:
    """The directory holding config.json: an archive often wraps the model in one folder."""
    if (directory / "config.json").exists():
        return directory
    children = list(directory.iterdir())
    if len(children) == 1 and children[0].is_dir() and (children[0] / "config.json").exists():
        return children[0]
    return directory


def _download_prefix(
    client: S3Client, settings: S3Settings, remotes: list[RemoteFile], staging: Path,
    bucket: str, events: EventSink, cancel: CancelToken,
) -> tuple[int, list[FetchedFile]]:  # fmt: skip
    tasks = []
    for remote in remotes:
        target = staging / remote.rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tasks.append(TransferTask(bucket, remote.key, target, remote.size, etag=remote.etag))
    moved = run_transfers(client, settings, tasks, direction="download", events=events, cancel=cancel, stage=STAGE)
    events(STAGE, "verify", None, f"checking sha256 of {len(tasks)} files")
    digests = sha256_files([t.path for t in tasks], workers=settings.max_concurrency, cancel=cancel)
    files = [
        checked_download(remote, task, digest) for remote, task, digest in zip(remotes, tasks, digests, strict=True)
    ]
    return moved, files


def checked_download(remote: RemoteFile, task: TransferTask, digest: str) -> FetchedFile:
    """The downloaded file, once its size and (when the source records one) sha256 match."""
    size = task.path.stat().st_size
    if size != remote.size:
        raise InfrastructureError(
            f"Downloaded {size} bytes of {task.uri}, which is {remote.size} bytes. Retry the job."
        )
    if remote.sha256 is not None and digest != remote.sha256:
        raise InputError(
            f"{task.uri} does not match its recorded sha256 ({remote.sha256[:12]}..., content "
            f"{digest[:12]}...): the object is corrupt or was replaced without updating its checksum. "
            "Re-upload it."
        )
    return FetchedFile(path=remote.rel, size=size, sha256=digest, key=remote.key,
                       etag=remote.etag, verified=remote.sha256 is not None)  # fmt: skip


def _download_archive(
    client: S3Client,
    remote: RemoteFile,
    bucket: str,
    staging: Path,
    events: EventSink,
    cancel: CancelToken,
    dropped: list[str],
) -> tuple[int, list[FetchedFile]]:
    uri = f"s3://{bucket}/{remote.key}"
    attempts = int(client.meta.config.retries.get("total_max_attempts", 5))
    progress = {"done": 0, "reported": 0}

    def on_bytes(count: int) -> None:
        progress["done"] += count
        if progress["done"] - progress["reported"] >= 16 * MiB or progress["done"] == remote.size:
            progress["reported"] = progress["done"]
            events(STAGE, "extract", progress["done"] / max(remote.size, 1),
                   f"{progress['done'] / MiB:.1f} of {remote.size / MiB:.1f} MiB of {uri}",
                   bytes_done=progress["done"], bytes_total=remote.size)  # fmt: skip

    reader = RangeReader(client, bucket, remote.key, etag=remote.etag, size=remote.size,
                         attempts=attempts, cancel=cancel, on_bytes=on_bytes)  # fmt: skip
    with reader:
        names = extract_tar_stream(reader, staging, cancel, dropped=dropped)
    if reader.position != remote.size:
        raise InfrastructureError(f"Read {reader.position} bytes of {uri}, which is {remote.size}. Retry.")
    digest = reader.sha256.hexdigest()
    if remote.sha256 is not None and digest != remote.sha256:
        raise InputError(
            f"{uri} does not match its recorded sha256: the archive is corrupt or was replaced. Re-upload it."
        )
    digests = sha256_files([staging / name for name in names], workers=4, cancel=cancel)
    files = [FetchedFile(path=name, size=(staging / name).stat().st_size, sha256=digest)
             for name, digest in zip(names, digests, strict=True)]  # fmt: skip
    return reader.position, files


def _cache_lookup(entry: Path, marker: Path) -> dict[str, Any] | None:
    """The cached record when the entry is complete (marker written last, sizes intact)."""
    try:
        record = json.loads(marker.read_text())
        files = [FetchedFile.model_validate(item) for item in record["files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if record.get("format") != _CACHE_FORMAT:
        return None
    for item in files:
        path = entry / item.path
        if not path.is_file() or path.stat().st_size != item.size:
            return None
    return record


def _copy_files(source: Path, dest: Path, files: list[FetchedFile], events: EventSink, cancel: CancelToken) -> None:
    """Copy a cache entry into ``dest``; on failure or cancel, remove ``dest`` rather than leave half."""
    total = sum(item.size for item in files) or 1
    done = 0
    dest.mkdir(parents=True, exist_ok=True)
    try:
        for item in files:
            cancel.raise_if_cancelled()
            target = dest / item.path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / item.path, target)
            done += item.size
            events(STAGE, "cache", done / total, f"copied {item.path} from the local cache")
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def _store_in_cache(staging: Path, entry: Path, marker: Path, source: dict[str, Any], files: list[FetchedFile]) -> None:
    """Make a complete staging directory a cache entry; its marker, written last, makes it valid."""
    shutil.rmtree(entry, ignore_errors=True)  # an entry without its marker is incomplete
    os.replace(staging, entry)
    record = {"format": _CACHE_FORMAT, **source, "files": [item.model_dump() for item in files]}
    partial = marker.with_suffix(".partial")
    partial.write_text(json.dumps(record))
    os.replace(partial, marker)


def _install(staging: Path, dest: Path) -> None:
    """Move a complete staging directory into place as ``dest`` (which is absent or empty)."""
    if dest.exists():
        dest.rmdir()
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, dest)


def fetch_model(
    uri: str,
    dest_dir: Path | str,
    *,
    settings: S3Settings | None = None,
    events: EventSink = NULL_SINK,
    cancel: CancelToken | None = None,
    client: S3Client | None = None,
) -> FetchedModel:
    """Download the model at ``uri`` into ``dest_dir`` (absent or empty) and return what arrived.

    Raises InputError for a source that is missing, unsafe, or fails integrity checks,
    InfrastructureError when S3 stays unreachable after retries, JobCancelled when stopped; in
    every failure ``dest_dir`` is left without a partial model.
    """
    location = parse_s3_uri(uri)
    settings = settings or S3Settings()
    cancel = cancel or CancelToken()
    client = client or make_client(settings)
    dest = Path(dest_dir)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ValueError(f"fetch_model needs an absent or empty destination, and {dest} is not")
    events(STAGE, "list", 0.0, f"listing {location.uri}")
    archive = is_archive_key(location.key)
    dropped: list[str] = []
    if archive:
        head = _head(client, location.bucket, location.key)
        remotes = [RemoteFile(location.key, "", int(head["ContentLength"]), head["ETag"], _recorded_sha256(head))]
    else:
        remotes = list_remote_files(client, location, settings, cancel, dropped=dropped)
    etags = {remote.key: remote.etag for remote in remotes}
    cache_key = _cache_key(location, remotes)

    def result(root: Path, files: list[FetchedFile], from_cache: bool, moved: int) -> FetchedModel:
        return FetchedModel(source_uri=uri, path=root, files=files, total_bytes=sum(f.size for f in files),
                            etags=etags, archive=archive, from_cache=from_cache, bytes_downloaded=moved,
                            dropped=dropped)  # fmt: skip

    cache_dir = settings.cache_dir
    if cache_dir is not None:
        entry, marker = cache_dir / cache_key, cache_dir / f"{cache_key}.json"
        record = _cache_lookup(entry, marker)
        if record is not None:
            files = [FetchedFile.model_validate(item) for item in record["files"]]
            dropped.extend(record.get("dropped", []))
            events(STAGE, "cache", 0.0, f"{location.uri} is cached (same ETags); not downloading")
            _copy_files(entry, dest, files, events, cancel)
            return result(_model_root(dest), files, True, 0)
        cache_dir.mkdir(parents=True, exist_ok=True)
    staging_parent = cache_dir if cache_dir is not None else dest.parent
    staging_parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".optjob-fetch-", dir=staging_parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would follow the directory to its final place
    try:
        if archive:
            moved, files = _download_archive(client, remotes[0], location.bucket, staging, events, cancel, dropped)
        else:
            moved, files = _download_prefix(client, settings, remotes, staging, location.bucket, events, cancel)
        if cache_dir is None:
            _install(staging, dest)
        else:
            record = {"source_uri": location.uri, "etags": etags, "dropped": dropped}
            _store_in_cache(staging, entry, marker, record, files)
            _copy_files(entry, dest, files, events, cancel)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    events(STAGE, "done", 1.0, f"fetched {len(files)} files, {moved / MiB:.1f} MiB downloaded")
    return result(_model_root(dest), files, False, moved)
