"""Durable progress of a job at its output prefix, so a killed job resumes instead of starting over.

A worker killed mid-job (the kernel's OOM killer, a lost node, a batch scheduler's retry after a
timeout) runs no cleanup: the output shards it finished stay at their final keys, and without a
record of them the next attempt would find "objects that no optjob job published" and refuse the
prefix. ``optjob-progress.json`` is that record: which units (output files) are finished, with
their size and sha256 and what the stage needs to account for them without redoing them, under a
fingerprint of everything that decides their content (the source's ETags and sizes, the plan, the
versions of optjob and the libraries that compute the bytes).

Every publisher writes one (with no units) when it claims a prefix, so a rerun of any job that died
mid-publish takes its prefix back instead of refusing it; the tensor-streaming path adds its units.
It is never mistaken for a published model: it sits beside the files under a reserved name, and a
prefix is complete only when ``optjob-manifest.json`` exists. It is removed when the model is
published and when the job ends FAILED or STOPPED (the publisher's rollback); only a process that
died without cleaning up leaves it behind, which is exactly when it is needed. A retried attempt
with the same fingerprint re-checks each finished unit's sha256 before skipping it; anything else
starts clean.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field

from optjob.storage.layout import PROGRESS_NAME
from optjob.storage.s3 import S3Client, storage_error
from optjob.storage.uri import S3Location

PROGRESS_FORMAT = 1
_FINGERPRINT_LIBRARIES = ("optjob", "torch", "transformers", "safetensors", "compressed-tensors", "llmcompressor")


class FinishedUnit(BaseModel):
    """One finished output file and the stage's own account of it (figures, tensor names)."""

    path: str
    size: int
    sha256: str
    stage: dict[str, Any] = Field(default_factory=dict)
    made_by: str | None = Field(None, description="the helper worker's node, when a helper of the job made it")


class Progress(BaseModel):
    format_version: int = PROGRESS_FORMAT
    job_arn: str
    fingerprint: str
    attempt: int = 1
    units: dict[str, FinishedUnit] = Field(default_factory=dict)
    updated_at: str = ""


def fingerprint(source: list[tuple[str, str, int]], plan: dict[str, Any]) -> str:
    """What decides the output's bytes: (path, ETag, size) of every source object, the plan, versions."""
    from importlib import metadata

    versions = {}
    for name in _FINGERPRINT_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    identity = {"source": sorted(source), "plan": plan, "versions": versions}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def read_progress(client: S3Client, location: S3Location) -> Progress | None:
    """The prefix's progress record, or None (absent, or not one we can read: then it is ignored)."""
    key = location.child(PROGRESS_NAME).key
    try:
        body = client.get_object(Bucket=location.bucket, Key=key)["Body"].read()
    except client.exceptions.NoSuchKey:
        return None
    except Exception as exc:
        raise storage_error(exc, "read", location.child(PROGRESS_NAME).uri) from exc
    try:
        progress = Progress.model_validate_json(body)
    except ValueError:
        return None
    return progress if progress.format_version == PROGRESS_FORMAT else None


class ProgressLog:
    """Writes the record after every finished unit (one small PutObject each)."""

    def __init__(self, client: S3Client, location: S3Location, progress: Progress,
                 extra_args: dict[str, Any] | None = None) -> None:  # fmt: skip
        self.client, self.location, self.progress = client, location, progress
        self.extra_args = dict(extra_args or {})

    def record(self, unit: FinishedUnit) -> None:
        self.progress.units[unit.path] = unit
        self.save()

    def save(self) -> None:
        self.progress.updated_at = datetime.now(UTC).isoformat(timespec="seconds")
        body = self.progress.model_dump_json().encode()
        try:
            self.client.put_object(Bucket=self.location.bucket, Key=self.location.child(PROGRESS_NAME).key,
                                   Body=body, ContentType="application/json", **self.extra_args)  # fmt: skip
        except Exception as exc:
            raise storage_error(exc, "upload", self.location.child(PROGRESS_NAME).uri) from exc
