"""Publish an optimized model to S3OutputLocation: artifacts first, the manifest last.

The prefix itself is the model directory, uncompressed, as the SageMaker SDK deploys it
(``S3DataType=S3Prefix``, ``CompressionType=None``). S3 has no atomic multi-object write, so
completeness is a convention: ``optjob-manifest.json`` is written only after every artifact is in
place, and a consumer treats a prefix as complete only when it exists. A failed or stopped publish
therefore writes no manifest, aborts its multipart uploads and deletes what it uploaded; a prefix
holding another job's manifest (or objects of unknown origin) is refused unless ``overwrite``, and
an overwrite removes the old manifest *first* so the prefix never claims to be a mix of two jobs.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import threading
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from optjob.errors import InfrastructureError, InputError, JobFailed
from optjob.runtime.cancel import CancelToken
from optjob.runtime.events import NULL_SINK, EventSink
from optjob.runtime.phases import PhaseClock
from optjob.storage.hashing import sha256_file, sha256_files
from optjob.storage.layout import (
    MANIFEST_FORMAT_VERSION,
    MANIFEST_NAME,
    PROGRESS_NAME,
    RESERVED_NAMES,
    SHA256_METADATA,
)
from optjob.storage.progress import Progress, ProgressLog, read_progress
from optjob.storage.s3 import MiB, S3Client, S3Settings, make_client, storage_error
from optjob.storage.tensorstream.multipart import MultipartObjectWriter, UploadWindow, WrittenObject
from optjob.storage.transfer import TransferTask, run_transfers
from optjob.storage.uri import S3Location, parse_s3_uri

STAGE = "upload"
_VERSIONED_LIBRARIES = ("optjob", "torch", "transformers", "safetensors", "boto3", "botocore")


class ManifestFile(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: str
    size: int
    sha256: str


class OutputManifest(BaseModel):
    """``optjob-manifest.json``. The caller's fields (source URI and ETags, techniques with resolved
    parameters, metrics) are kept as given; publish adds the files, versions and timings."""

    model_config = ConfigDict(extra="allow")

    format_version: int = MANIFEST_FORMAT_VERSION
    job_name: str
    job_arn: str
    output_uri: str
    files: list[ManifestFile]
    total_bytes: int
    library_versions: dict[str, str]
    timings: dict[str, Any]
    published_at: str


class PublishResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    output_uri: str
    manifest_uri: str
    files: list[ManifestFile]
    total_bytes: int
    manifest: dict[str, Any]
    replaced_job_arn: str | None = None


def sse_args(kms_key_id: str | None) -> dict[str, str]:
    """Request parameters for SSE-KMS with OutputConfig.KmsKeyId (none without a key)."""
    return {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": kms_key_id} if kms_key_id else {}


def library_versions() -> dict[str, str]:
    versions = {}
    for name in _VERSIONED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _local_files(local_dir: Path) -> list[tuple[str, Path]]:
    """Every file of the output, refusing links and special files: what we publish is exactly what
    the manifest lists, and a link could publish something from outside the output directory."""
    if not local_dir.is_dir():
        raise ValueError(f"publish_model needs a directory, and {local_dir} is not one")
    found = []
    for dirpath, dirnames, filenames in os.walk(local_dir):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode) or not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise ValueError(f"{path} is a link or special file; only regular files are published")
        for name in filenames:
            path = Path(dirpath) / name
            found.append((path.relative_to(local_dir).as_posix(), path))
    if not found:
        raise ValueError(f"{local_dir} is empty; there is nothing to publish")
    reserved = sorted(rel for rel, _ in found if rel in RESERVED_NAMES)
    if reserved:
        raise ValueError(f"{local_dir} holds {reserved[0]}, a name publish writes itself")
    return sorted(found)


def _list_keys(client: S3Client, location: S3Location) -> list[str]:
    try:
        paginator = client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=location.bucket, Prefix=location.prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]
    except Exception as exc:
        raise storage_error(exc, "list", location.uri) from exc


def get_json(uri: str, *, settings: S3Settings | None = None, client: S3Client | None = None) -> Any | None:
    """The JSON object at ``uri``, or None when there is no such object."""
    location = parse_s3_uri(uri)
    client = client or make_client(settings)
    try:
        body = client.get_object(Bucket=location.bucket, Key=location.key)["Body"].read()
    except client.exceptions.NoSuchKey:
        return None
    except Exception as exc:
        raise storage_error(exc, "read", uri) from exc
    return json.loads(body)


def put_json(
    uri: str,
    obj: Any,
    *,
    kms_key_id: str | None = None,
    settings: S3Settings | None = None,
    client: S3Client | None = None,
) -> str:
    """Write ``obj`` as one JSON object (a single PUT: readers see all of it or none); returns the ETag."""
    location = parse_s3_uri(uri)
    client = client or make_client(settings)
    body = json.dumps(obj, indent=2, sort_keys=True).encode()
    try:
        response = client.put_object(
            Bucket=location.bucket, Key=location.key, Body=body,
            ContentType="application/json", **sse_args(kms_key_id),
        )  # fmt: skip
    except Exception as exc:
        raise storage_error(exc, "write", uri) from exc
    return str(response["ETag"])


def read_manifest(
    output_uri: str, *, settings: S3Settings | None = None, client: S3Client | None = None
) -> dict[str, Any] | None:
    """The manifest of a published prefix; None means the prefix is not (or not yet) complete."""
    location = parse_s3_uri(output_uri)
    return get_json(location.child(MANIFEST_NAME).uri, settings=settings, client=client)


def publish_file(
    local_path: Path | str,
    uri: str,
    *,
    kms_key_id: str | None = None,
    settings: S3Settings | None = None,
    client: S3Client | None = None,
    events: EventSink = NULL_SINK,
    cancel: CancelToken | None = None,
) -> str:
    """Upload one file (multipart when large, aborted on failure) with its sha256; returns the sha256."""
    location = parse_s3_uri(uri)
    settings = settings or S3Settings()
    client = client or make_client(settings)
    cancel = cancel or CancelToken()
    path = Path(local_path)
    digest = sha256_file(path, cancel)
    extra = {"Metadata": {SHA256_METADATA: digest}, **sse_args(kms_key_id)}
    task = TransferTask(location.bucket, location.key, path, path.stat().st_size, extra)
    run_transfers(client, settings, [task], direction="upload", events=events, cancel=cancel, stage=STAGE)
    return digest


def _delete_keys(client: S3Client, bucket: str, keys: set[str]) -> None:
    ordered = sorted(keys)
    for start in range(0, len(ordered), 1000):
        batch = [{"Key": key} for key in ordered[start : start + 1000]]
        response = client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        errors = response.get("Errors") or []
        if errors:
            raise RuntimeError(f"could not delete s3://{bucket}/{errors[0].get('Key')}: {errors[0].get('Message')}")


def _rollback(client: S3Client, location: S3Location, keys: set[str], events: EventSink) -> None:
    """Undo a failed publish: abort our multipart uploads and delete what we wrote. Best effort:
    if S3 is unreachable now too, say so; the missing manifest still marks the prefix incomplete."""
    try:
        uploads = client.list_multipart_uploads(Bucket=location.bucket, Prefix=location.prefix)
        for upload in uploads.get("Uploads", []):
            if upload["Key"] in keys:
                client.abort_multipart_upload(Bucket=location.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        _delete_keys(client, location.bucket, keys)
    except Exception as exc:
        events.warning(
            STAGE,
            f"could not clean up {location.uri} after the failed publish ({type(exc).__name__}: {exc}); "
            f"it holds no {MANIFEST_NAME}, so it is not a complete model. Delete it by hand.",
        )
    else:
        events(STAGE, "rollback", None, f"removed {len(keys)} objects and aborted multipart uploads")


def _abort_multipart_uploads(client: S3Client, location: S3Location) -> None:
    try:
        uploads = client.list_multipart_uploads(Bucket=location.bucket, Prefix=location.prefix)
        for upload in uploads.get("Uploads", []):
            client.abort_multipart_upload(Bucket=location.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    except Exception as exc:
        raise storage_error(exc, "clean up", location.uri) from exc


def _existing_owner(client: S3Client, location: S3Location, keys: list[str]) -> dict[str, Any] | None:
    manifest_key = location.child(MANIFEST_NAME).key
    if manifest_key not in keys:
        return None
    try:
        existing = get_json(location.child(MANIFEST_NAME).uri, client=client)
    except ValueError:  # unreadable manifest: still someone's claim on the prefix
        existing = {}
    return existing if isinstance(existing, dict) else {}


def _check_destination(
    location: S3Location, keys: list[str], existing: dict[str, Any] | None, job_arn: str, overwrite: bool
) -> None:
    if overwrite:
        return
    if existing is not None and existing.get("job_arn") != job_arn:
        raise InputError(
            f"OutputConfig.S3OutputLocation {location.uri} already holds the published model of "
            f"{_owner(existing, job_arn)}; it is not overwritten. Choose another S3OutputLocation, delete that "
            "prefix, or allow overwriting."
        )
    foreign = [key for key in keys if key[len(location.prefix) :] not in RESERVED_NAMES]
    if existing is None and foreign:
        raise InputError(
            f"OutputConfig.S3OutputLocation {location.uri} already holds {len(foreign)} object(s) "
            f"(e.g. {foreign[0]}) that no optjob job published. Choose an empty prefix, or allow overwriting."
        )


def _arn_account(arn: Any) -> str | None:
    parts = arn.split(":") if isinstance(arn, str) else []
    return parts[4] if len(parts) > 5 and parts[4] else None


def _owner(existing: dict[str, Any], job_arn: str) -> str:
    """Which job holds the prefix, as far as the caller may know: a job of its own account by name
    and ARN, any other as "a job of another account" (its name and account number are that
    account's business, even when both write to one bucket)."""
    arn = existing.get("job_arn")
    if _arn_account(arn) is None or _arn_account(arn) != _arn_account(job_arn):
        return "a job of another account (or of unknown origin)"
    return f"job {existing.get('job_name') or arn} ({arn})"


class Publisher:
    """Publishes one model directory to an output prefix: files as they become final, manifest last.

    ``publish_model`` uses it for a finished directory; a streaming stage uses it to ship each
    output shard while the next one is still being produced (``upload``), and ``commit`` then
    uploads what is left and writes the manifest. Until ``commit`` writes the manifest the prefix
    is incomplete; ``rollback`` removes everything this publisher wrote and aborts its multipart
    uploads. ``upload`` may be called from another thread than ``open``/``commit``; it emits no
    events (event sinks are not thread-safe), ``commit`` reports the totals.
    """

    def __init__(
        self,
        output_uri: str,
        *,
        job_name: str,
        job_arn: str,
        kms_key_id: str | None,
        settings: S3Settings | None = None,
        events: EventSink = NULL_SINK,
        cancel: CancelToken | None = None,
        overwrite: bool = False,
        client: S3Client | None = None,
    ) -> None:
        self.location = parse_s3_uri(output_uri)
        self.job_name, self.job_arn, self.kms_key_id = job_name, job_arn, kms_key_id
        self.settings = settings or S3Settings()
        self.events = events
        self.cancel = cancel or CancelToken()
        self.overwrite = overwrite
        self.client = client or make_client(self.settings)
        self._uploaded: dict[str, tuple[ManifestFile, int]] = {}  # rel -> (entry, mtime_ns at upload)
        self._lock = threading.Lock()
        self._existing_keys: list[str] = []
        self._existing: dict[str, Any] | None = None
        self._started = time.time()
        self._upload_seconds = 0.0
        self._opened = False
        self._streamed: set[str] = set()
        self.previous: Progress | None = None  # an earlier attempt's record of finished units, if any

    @property
    def manifest_key(self) -> str:
        return self.location.child(MANIFEST_NAME).key

    def _written_keys(self) -> set[str]:
        with self._lock:
            return {self.location.child(rel).key for rel in self._uploaded}

    def open(self) -> None:
        """Check the prefix may be written (not another job's model, not foreign files).

        Files left by an earlier attempt of this same job that died before cleaning up (its
        ``optjob-progress.json`` names this job) are ours: they are kept for ``previous`` to offer
        for resuming, and whatever this attempt does not reuse is deleted at ``commit``."""
        self._existing_keys = _list_keys(self.client, self.location)
        self._existing = _existing_owner(self.client, self.location, self._existing_keys)
        if self._existing is None and self.location.child(PROGRESS_NAME).key in self._existing_keys:
            found = read_progress(self.client, self.location)
            if found is not None and found.job_arn == self.job_arn:
                self.previous = found
                _abort_multipart_uploads(self.client, self.location)  # the dead attempt's unfinished parts
                with self._lock:  # ours from here on: removed by a rollback, replaced or deleted by commit
                    for key in self._existing_keys:
                        rel = key[len(self.location.prefix) :]
                        if rel not in RESERVED_NAMES:
                            self._uploaded.setdefault(rel, (ManifestFile(path=rel, size=0, sha256="0" * 64), -1))
        if self.previous is None:
            _check_destination(self.location, self._existing_keys, self._existing, self.job_arn, self.overwrite)
        self._opened = True  # from here on the prefix is ours to write (and to clean up)
        if self.previous is None:  # claim it: if this process dies, a rerun of the job may take it back
            claim = Progress(job_arn=self.job_arn, fingerprint="")
            try:
                ProgressLog(self.client, self.location, claim, extra_args=sse_args(self.kms_key_id)).save()
            except InfrastructureError:
                if self.kms_key_id and self._writes_without_the_key(claim):
                    raise InputError(
                        f"Cannot write to {self.location.uri} encrypted with OutputConfig.KmsKeyId "
                        f"'{self.kms_key_id[:256]}': S3 refuses the key while it accepts the same write without it, "
                        "so the key does not exist, is disabled, or the job's role may not use it. Check KmsKeyId "
                        "and the key policy."
                    ) from None
                raise
        if self._existing is not None:
            owner = self._existing.get("job_name", "a previous job")
            self.events(STAGE, "replace", None, f"replacing the model of {owner}")
            try:  # the prefix is incomplete from here on
                self.client.delete_object(Bucket=self.location.bucket, Key=self.manifest_key)
            except Exception as exc:
                raise storage_error(exc, "delete", self.location.child(MANIFEST_NAME).uri) from exc

    def _writes_without_the_key(self, claim: Progress) -> bool:
        """Whether the claim that failed with SSE-KMS succeeds without it: then the key is the input at
        fault, whatever S3 called the error (an S3-compatible server may answer a bad key with
        InternalError). The probe holds only the claim (a job ARN) and is deleted at once."""
        try:
            ProgressLog(self.client, self.location, claim).save()
        except JobFailed:
            return False
        with contextlib.suppress(Exception):  # a leftover claim is what a rerun of the job takes back anyway
            self.client.delete_object(Bucket=self.location.bucket, Key=self.location.child(PROGRESS_NAME).key)
        return True

    def upload(self, rel: str, path: Path, *, events: EventSink = NULL_SINK) -> ManifestFile:
        """Hash and upload one final file of the model directory (multipart when large)."""
        started = time.monotonic()
        if rel in RESERVED_NAMES:
            raise ValueError(f"{rel} is a name publish writes itself")
        digest = sha256_file(path, self.cancel)
        stat_before = path.stat()
        extra = {"Metadata": {SHA256_METADATA: digest}, **sse_args(self.kms_key_id)}
        task = TransferTask(self.location.bucket, self.location.child(rel).key, path, stat_before.st_size, extra)
        entry = ManifestFile(path=rel, size=stat_before.st_size, sha256=digest)
        with self._lock:  # registered first, so a rollback also removes a half-finished upload
            self._uploaded[rel] = (entry, stat_before.st_mtime_ns)
        run_transfers(self.client, self.settings, [task], direction="upload", events=events,
                      cancel=self.cancel, stage=STAGE)  # fmt: skip
        with self._lock:
            self._upload_seconds += time.monotonic() - started
        return entry

    def stream_object(
        self,
        rel: str,
        *,
        expected_bytes: int,
        window: UploadWindow | None = None,
        clock: PhaseClock | None = None,
        spool: Path | None = None,
    ) -> MultipartObjectWriter:
        """A writer that uploads ``rel`` as it is produced (multipart); ``record_streamed`` it once closed.

        S3 metadata is fixed when an upload starts, before the content's sha256 is known, so a
        streamed file's sha256 is recorded in the manifest only (not as ``x-amz-meta-sha256``)."""
        if rel in RESERVED_NAMES:
            raise ValueError(f"{rel} is a name publish writes itself")
        with self._lock:  # registered first, so a rollback also removes it
            self._uploaded[rel] = (ManifestFile(path=rel, size=0, sha256="0" * 64), -1)
        return MultipartObjectWriter(
            self.client, self.location.bucket, self.location.child(rel).key, expected_bytes=expected_bytes,
            window=window, extra_args=sse_args(self.kms_key_id), cancel=self.cancel, clock=clock, spool=spool,
        )  # fmt: skip

    def reserve(self, rel: str) -> None:
        """``rel`` is being written elsewhere for this job (a helper worker): a rollback removes it too."""
        if rel in RESERVED_NAMES:
            raise ValueError(f"{rel} is a name publish writes itself")
        with self._lock:
            self._uploaded.setdefault(rel, (ManifestFile(path=rel, size=0, sha256="0" * 64), -1))

    def record_streamed(self, rel: str, written: WrittenObject, local: Path | None = None) -> ManifestFile:
        """Mark a streamed file final; ``commit`` lists it and, when ``local`` is unchanged, skips it."""
        entry = ManifestFile(path=rel, size=written.size, sha256=written.sha256)
        mtime = local.stat().st_mtime_ns if local is not None and local.is_file() else -1
        with self._lock:
            self._uploaded[rel] = (entry, mtime)
            self._streamed.add(rel)
        return entry

    def commit(self, local_dir: Path | str, manifest: dict[str, Any]) -> PublishResult:
        """Upload every file of ``local_dir`` not uploaded yet (or changed since), then the manifest."""
        json.dumps(manifest)  # fail before uploading gigabytes if the caller's fields cannot be written
        committing = time.time()
        files = _local_files(Path(local_dir))
        with self._lock:
            done = dict(self._uploaded)
        todo = [(rel, path) for rel, path in files
                if rel not in done or path.stat().st_mtime_ns != done[rel][1]]  # fmt: skip
        self.events(STAGE, "hash", 0.0, f"computing sha256 of {len(todo)} files")
        digests = sha256_files([path for _, path in todo], workers=self.settings.max_concurrency, cancel=self.cancel)
        hashed = time.time()
        base_args = sse_args(self.kms_key_id)
        tasks = [
            TransferTask(self.location.bucket, self.location.child(rel).key, path, path.stat().st_size,
                         {"Metadata": {SHA256_METADATA: digest}, **base_args})
            for (rel, path), digest in zip(todo, digests, strict=True)
        ]  # fmt: skip
        with self._lock:
            for (rel, path), digest in zip(todo, digests, strict=True):
                self._uploaded[rel] = (ManifestFile(path=rel, size=path.stat().st_size, sha256=digest), 0)
        run_transfers(self.client, self.settings, tasks, direction="upload", events=self.events,
                      cancel=self.cancel, stage=STAGE)  # fmt: skip
        self.cancel.raise_if_cancelled()
        with self._lock:
            local = {rel for rel, _ in files} | self._streamed
            listed = sorted((entry for rel, (entry, _) in self._uploaded.items() if rel in local),
                            key=lambda item: item.path)  # fmt: skip
        new_keys = {self.location.child(item.path).key for item in listed}
        stale = [key for key in self._existing_keys
                 if key not in new_keys and key[len(self.location.prefix):] not in RESERVED_NAMES]  # fmt: skip
        if stale:  # the replaced job's files that this output does not have
            self.events(STAGE, "replace", None, f"removing {len(stale)} files of the replaced model")
            try:
                _delete_keys(self.client, self.location.bucket, set(stale))
            except Exception as exc:
                raise storage_error(exc, "delete old files under", self.location.uri) from exc
        finished = time.time()
        document = OutputManifest.model_validate(
            {
                **manifest,
                "job_name": self.job_name,
                "job_arn": self.job_arn,
                "format_version": MANIFEST_FORMAT_VERSION,
                "output_uri": self.location.uri,
                "files": [item.model_dump() for item in listed],
                "total_bytes": sum(item.size for item in listed),
                "library_versions": {**library_versions(), **manifest.get("library_versions", {})},
                "timings": {
                    **manifest.get("timings", {}),
                    "publish_started": self._started,
                    "publish_hash_seconds": round(hashed - committing, 3),
                    "publish_upload_seconds": round(finished - hashed + self._upload_seconds, 3),
                },
                "published_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        ).model_dump(mode="json")
        self.cancel.raise_if_cancelled()
        put_json(self.location.child(MANIFEST_NAME).uri, document, kms_key_id=self.kms_key_id, client=self.client)
        with contextlib.suppress(Exception):  # a leftover record is harmless beside a manifest, and ignored
            self.client.delete_object(Bucket=self.location.bucket, Key=self.location.child(PROGRESS_NAME).key)
        total = document["total_bytes"]
        self.events(STAGE, "done", 1.0, f"published {len(listed)} files ({total / MiB:.1f} MiB) to {self.location.uri}")
        return PublishResult(
            output_uri=self.location.uri,
            manifest_uri=self.location.child(MANIFEST_NAME).uri,
            files=listed,
            total_bytes=total,
            manifest=document,
            replaced_job_arn=self._existing.get("job_arn") if self._existing else None,
        )

    def rollback(self) -> None:
        """Remove what this publisher wrote (and the manifest key) and abort its multipart uploads.

        Does nothing before ``open`` accepted the prefix: another job's model is never touched.
        """
        if not self._opened:
            return
        progress = self.location.child(PROGRESS_NAME).key
        _rollback(self.client, self.location, self._written_keys() | {self.manifest_key, progress}, self.events)


def publish_model(
    local_dir: Path | str,
    output_uri: str,
    *,
    manifest: dict[str, Any],
    kms_key_id: str | None,
    settings: S3Settings | None = None,
    events: EventSink = NULL_SINK,
    cancel: CancelToken | None = None,
    overwrite: bool = False,
    client: S3Client | None = None,
) -> PublishResult:
    """Upload ``local_dir`` as the model directory at ``output_uri``, then its manifest.

    ``manifest`` must carry ``job_name`` and ``job_arn`` (they decide whose prefix this is) and may
    carry anything JSON-serialisable (source, techniques, metrics, timings). Raises InputError for a
    prefix owned by another job, the translated storage error or JobCancelled otherwise; after any
    failure no manifest exists and the uploaded objects have been removed.
    """
    job_arn, job_name = manifest.get("job_arn"), manifest.get("job_name")
    if not isinstance(job_arn, str) or not isinstance(job_name, str):
        raise ValueError("the manifest must name the job: job_name and job_arn (strings)")
    json.dumps(manifest)
    _local_files(Path(local_dir))  # refuse an empty directory, links or reserved names before any request
    publisher = Publisher(
        output_uri, job_name=job_name, job_arn=job_arn, kms_key_id=kms_key_id,
        settings=settings, events=events, cancel=cancel, overwrite=overwrite, client=client,
    )  # fmt: skip
    publisher.open()
    try:
        return publisher.commit(local_dir, manifest)
    except BaseException:
        publisher.rollback()
        raise


def discard_abandoned(output_uri: str, job_arn: str, *, settings: S3Settings | None = None) -> int:
    """Remove what a killed attempt of ``job_arn`` left at its output prefix; returns objects removed.

    A worker killed after Stop or MaxRuntime never ran its rollback, so its claim
    (``optjob-progress.json``) and any partial output stay, although the job says partial output was
    discarded. Only a prefix this job claimed and never published is touched: nothing happens when
    the claim names another job or a manifest exists. A claim is taken only on a prefix that held no
    one else's objects, so everything under it is this job's, except below a deeper prefix that
    another job has since claimed or published, which is left alone.
    """
    client = make_client(settings)
    location = parse_s3_uri(output_uri)
    keys = _list_keys(client, location)
    claim = location.child(PROGRESS_NAME).key
    if claim not in keys or location.child(MANIFEST_NAME).key in keys:
        return 0
    found = read_progress(client, location)
    if found is None or found.job_arn != job_arn:
        return 0
    others = {
        key.rsplit("/", 1)[0] + "/"
        for key in keys
        if key.rsplit("/", 1)[-1] in (MANIFEST_NAME, PROGRESS_NAME) and key != claim
    }

    def mine(key: str) -> bool:
        return not any(key.startswith(root) for root in others)

    ours = {key for key in keys if mine(key)}
    try:
        uploads = client.list_multipart_uploads(Bucket=location.bucket, Prefix=location.prefix)
        for upload in uploads.get("Uploads", []):
            if mine(upload["Key"]):
                client.abort_multipart_upload(Bucket=location.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        _delete_keys(client, location.bucket, ours)
    except Exception as exc:
        raise storage_error(exc, "clean up", location.uri) from exc
    return len(ours)
