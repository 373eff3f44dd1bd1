"""``optjob-status.json`` at the job's output location: how a scheduler user follows a job with S3 alone.

The object is the DescribeOptimizationJob response, as the API would return it (same members,
epoch-second timestamps), plus one extension member, ``OptjobWorker``, because Describe has no
member for what a person watching a long job wants most: progress. botocore's response parser
ignores members it does not model, and dropping ``OptjobWorker`` leaves a body that validates
against the Describe shape (the tests check both). ``OptjobWorker`` holds:

* ``Progress``: the latest pipeline event (stage, step, fraction, eta_s, message);
* ``UpdatedAt``: when this object was written (LastModifiedTime only moves on status changes, as
  in SageMaker, so a reader needs another clock to tell a live job from a dead worker);
* ``Host``: what the worker found on its host; ``Warnings``; and, once terminal, ``ExitCode``
  and the ``Published`` files.

It is written at every status transition and at least every ``OPTJOB_STATUS_INTERVAL_SECONDS``
(default 30) while the job runs, each time as one PUT, so a reader sees a whole object. The
storage layer reserves the name (``optjob.storage.layout.STATUS_NAME``): publishing neither
refuses a prefix because of it nor deletes it, and downloads of the prefix skip it.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from optjob.errors import JobFailed
from optjob.storage.layout import STATUS_NAME
from optjob.storage.publish import put_json
from optjob.storage.s3 import S3Client, make_client
from optjob.storage.uri import parse_s3_uri
from workers.jsonlog import JsonLog
from workers.state import JobState

INTERVAL_ENV = "OPTJOB_STATUS_INTERVAL_SECONDS"
DEFAULT_INTERVAL_S = 30.0
EXTENSION = "OptjobWorker"
_PROGRESS_KEYS = ("stage", "step", "fraction", "eta_s", "message", "level")


def status_uri(output_uri: str) -> str:
    return parse_s3_uri(output_uri).child(STATUS_NAME).uri


def interval_from_env() -> float:
    raw = os.environ.get(INTERVAL_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_INTERVAL_S
    except ValueError:
        value = DEFAULT_INTERVAL_S
    return min(max(value, 0.2), DEFAULT_INTERVAL_S)  # "at least every 30 s" is a promise; keep it


class StatusWriter:
    """Renders the state as the status object and PUTs it; a heartbeat thread keeps it fresh."""

    def __init__(
        self,
        state: JobState,
        output_uri: str,
        *,
        kms_key_id: str | None,
        host: dict[str, Any],
        log: JsonLog,
        interval_s: float | None = None,
        client: S3Client | None = None,
    ) -> None:
        self.state = state
        self.uri = status_uri(output_uri)
        self.kms_key_id = kms_key_id
        self.host = host
        self.log = log
        self.interval_s = interval_from_env() if interval_s is None else interval_s
        self._client = client
        self._lock = threading.Lock()
        self._progress: dict[str, Any] | None = None
        self._warnings: list[str] = []
        self._final: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures = 0

    # --- what goes in --------------------------------------------------------------------

    def progress(self, data: dict[str, Any]) -> None:
        with self._lock:
            self._progress = {k: data[k] for k in _PROGRESS_KEYS if data.get(k) is not None}
            self._progress["time"] = round(float(data.get("time", time.time())), 3)
            if data.get("level") == "warning" and data.get("message") and data["message"] not in self._warnings:
                self._warnings.append(str(data["message"]))

    def warnings(self, items: list[str]) -> None:
        with self._lock:
            self._warnings.extend(w for w in items if w not in self._warnings)

    def finish(self, exit_code: int, published: list[str] | None = None) -> None:
        with self._lock:
            self._final = {"ExitCode": exit_code}
            if published:
                self._final["Published"] = list(published)

    # --- what comes out ------------------------------------------------------------------

    def document(self) -> dict[str, Any]:
        body = self.state.describe().dump()
        with self._lock:
            extension: dict[str, Any] = {"UpdatedAt": round(time.time(), 3), "Host": self.host}
            if self._progress:
                extension["Progress"] = dict(self._progress)
            if self._warnings:
                extension["Warnings"] = list(self._warnings)
            extension.update(self._final)
        body[EXTENSION] = extension
        return body

    def write(self) -> bool:
        """PUT the current status. A failure is logged, never raised: the job matters more than its
        status object, and the job's own S3 operations will report a real storage outage."""
        try:
            document = self.document()
            if self._client is None:
                self._client = make_client()
            put_json(self.uri, document, kms_key_id=self.kms_key_id, client=self._client)
        except (JobFailed, OSError, ValueError) as exc:
            self._failures += 1
            if self._failures <= 3 or self._failures % 10 == 0:
                self.log.warning("status", message=f"could not write {self.uri}: {exc}", failures=self._failures)
            return False
        return True

    # --- heartbeat -----------------------------------------------------------------------

    def start_heartbeat(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="optjob-status", daemon=True)
            self._thread.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.write()
