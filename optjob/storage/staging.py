"""Finished stages of a multi-stage job, kept beside the output so that a rerun of the job skips them.

A job of several stages (quantization, then EAGLE training on the quantized model) that dies during a
later stage would otherwise redo every earlier one. After each stage but the last, its output
directory is uploaded under ``<output prefix>optjob-staging/<stage>/`` and recorded, with every
file's size and sha256 and the stage's figures, as a unit of the job's progress record
(``optjob-progress.json``, under the fingerprint of the source, the plan and the library versions).
A rerun of the same job with the same fingerprint downloads the last finished stage's directory,
re-checks every file's sha256 and goes on from the next stage; anything else starts clean.

The staging objects are never mistaken for a model (no manifest names them; ``optjob-staging/`` is
under a prefix that is only a model once ``optjob-manifest.json`` exists), and they are removed when
the model is published and when the job ends FAILED or STOPPED. Only a killed attempt leaves them,
for its rerun.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from optjob.errors import JobFailed
from optjob.runtime.cancel import CancelToken
from optjob.runtime.events import EventSink
from optjob.storage.hashing import sha256_file, sha256_files
from optjob.storage.progress import FinishedUnit, Progress, ProgressLog
from optjob.storage.publish import Publisher, sse_args
from optjob.storage.s3 import S3Settings
from optjob.storage.transfer import TransferTask, run_transfers

STAGING_PREFIX = "optjob-staging/"
STAGE = "staging"


def _digest(files: dict[str, list[Any]]) -> str:
    """One sha256 over the directory's file list (path, size, sha256), so a unit names its whole content."""
    lines = "".join(f"{rel}\t{size}\t{sha}\n" for rel, (size, sha) in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


class StageStore:
    """The finished stages of this job under its output prefix; opened after ``publisher.open``."""

    def __init__(self, publisher: Publisher, fingerprint: str, *, settings: S3Settings, events: EventSink,
                 cancel: CancelToken) -> None:  # fmt: skip
        self.publisher, self.settings, self.events, self.cancel = publisher, settings, events, cancel
        previous = publisher.previous
        attempt = previous.attempt + 1 if previous is not None else 1
        self.progress = ProgressLog(publisher.client, publisher.location,
                                    Progress(job_arn=publisher.job_arn, fingerprint=fingerprint, attempt=attempt),
                                    extra_args=sse_args(publisher.kms_key_id))  # fmt: skip
        self.units: dict[str, FinishedUnit] = {}
        if previous is not None and previous.fingerprint == fingerprint:
            self.units = {rel: unit for rel, unit in previous.units.items() if rel.startswith(STAGING_PREFIX)}
        elif previous is not None and previous.units:
            events(STAGE, "restart", None, "an earlier attempt left finished stages, but the source, the plan or the "
                   "library versions changed since: starting clean", level="warning")  # fmt: skip
        self._saved: list[str] = []

    @property
    def attempt(self) -> int:
        return self.progress.progress.attempt

    @staticmethod
    def unit_path(stage_dir_name: str) -> str:
        return f"{STAGING_PREFIX}{stage_dir_name}/"

    def finished(self, stage_dir_name: str) -> FinishedUnit | None:
        return self.units.get(self.unit_path(stage_dir_name))

    def save(self, stage_dir_name: str, out_dir: Path, metrics: dict[str, Any], warnings: list[str]) -> None:
        """Upload a finished stage's directory and record it (the progress record is written last)."""
        prefix = self.unit_path(stage_dir_name)
        paths = sorted(path for path in out_dir.rglob("*") if path.is_file())
        digests = sha256_files(paths, workers=self.settings.max_concurrency, cancel=self.cancel)
        files = {str(path.relative_to(out_dir)): [path.stat().st_size, digest]
                 for path, digest in zip(paths, digests, strict=True)}  # fmt: skip
        location = self.publisher.location
        tasks = [TransferTask(location.bucket, location.child(prefix + rel).key, out_dir / rel, size,
                              sse_args(self.publisher.kms_key_id))
                 for rel, (size, _sha) in files.items()]  # fmt: skip
        self._saved.append(prefix)
        total = sum(size for size, _ in files.values())
        self.events(STAGE, "save", None, f"keeping {stage_dir_name} ({total / 2**20:.1f} MiB) so a rerun can skip it")
        run_transfers(self.publisher.client, self.settings, tasks, direction="upload", events=self.events,
                      cancel=self.cancel, stage=STAGE)  # fmt: skip
        unit = FinishedUnit(
            path=prefix,
            size=total,
            sha256=_digest(files),
            stage={"metrics": metrics, "warnings": warnings, "files": files},
        )
        self.progress.record(unit)

    def restore(self, stage_dir_name: str, dest: Path) -> FinishedUnit | None:
        """Download a finished stage's directory into ``dest`` and re-check every file; None if it
        is not recorded or does not match (the stages then run again)."""
        unit = self.finished(stage_dir_name)
        if unit is None:
            return None
        files: dict[str, list[Any]] = unit.stage.get("files", {})
        location = self.publisher.location
        tasks = [TransferTask(location.bucket, location.child(unit.path + rel).key, dest / rel, size)
                 for rel, (size, _sha) in files.items()]  # fmt: skip
        try:
            if _digest(files) != unit.sha256:
                raise ValueError("its file list does not match its record")
            for task in tasks:
                task.path.parent.mkdir(parents=True, exist_ok=True)
            run_transfers(self.publisher.client, self.settings, tasks, direction="download", events=self.events,
                          cancel=self.cancel, stage=STAGE)  # fmt: skip
            for rel, (_size, sha) in files.items():
                if sha256_file(dest / rel, self.cancel) != sha:
                    raise ValueError(f"{rel} does not match its recorded sha256")
        except (JobFailed, ValueError, OSError) as exc:
            self.events(STAGE, "redo", None, f"{stage_dir_name}: not reused ({exc}); running the stages again",
                        level="warning")  # fmt: skip
            return None
        self.events(STAGE, "reused", None, f"{stage_dir_name}: finished by an earlier attempt of this job, "
                    f"{len(files)} files re-checked (sha256), not run again")  # fmt: skip
        return unit

    def carry_over(self, stage_dir_names: list[str]) -> None:
        """Record stages reused from an earlier attempt as finished in this attempt's record too, so a
        rerun after this attempt still finds them."""
        for name in stage_dir_names:
            unit = self.finished(name)
            if unit is not None:
                self.progress.progress.units[unit.path] = unit
        self.progress.save()

    def clear(self) -> None:
        """Remove every staging object under the output prefix (at publish, FAILED and STOPPED)."""
        client, location = self.publisher.client, self.publisher.location
        prefix = location.child(STAGING_PREFIX).key
        keys: list[str] = []
        try:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=prefix):
                keys.extend(item["Key"] for item in page.get("Contents", []))
            for start in range(0, len(keys), 1000):
                batch = [{"Key": key} for key in keys[start : start + 1000]]
                client.delete_objects(Bucket=location.bucket, Delete={"Objects": batch, "Quiet": True})
        except Exception as exc:  # noqa: BLE001 - the model is what matters; say what is left
            self.events.warning(STAGE, f"could not remove {location.child(STAGING_PREFIX).uri} ({type(exc).__name__}); "
                                "delete it by hand")  # fmt: skip
