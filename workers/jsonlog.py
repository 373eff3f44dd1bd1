"""Structured logs: one JSON object per line on stdout, for CloudWatch, ``kubectl logs`` and Slurm.

Every line has ``time`` (ISO-8601 UTC), ``level``, ``event`` (``host``, ``spec``, ``status``,
``progress``, ``warning``, ``error``, ``exit``) and ``job`` once the job is known; progress lines
add the pipeline event's ``stage``, ``step``, ``fraction``, ``eta_s`` and ``message``. stdout
carries nothing else: the pipeline runs in a child process whose own output (library banners,
progress bars) goes to stderr, so a log shipper can parse every stdout line as JSON.

Progress is throttled per (stage, step): a transfer may report many times a second, a person
needs about one line a second. Stage changes, completions, warnings and errors always print.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Any, TextIO

_PROGRESS_INTERVAL_S = 1.0


class JsonLog:
    def __init__(self, stream: TextIO | None = None, *, progress_interval_s: float = _PROGRESS_INTERVAL_S) -> None:
        self._stream = stream or sys.stdout
        self._lock = threading.Lock()
        self._job: str | None = None
        self._last_progress: dict[tuple[str, str], float] = {}
        self._last_key: tuple[str, str] | None = None
        self._interval = progress_interval_s

    def bind(self, job: str) -> None:
        """Name the job on every following line (set once the spec is read)."""
        self._job = job

    def emit(self, event: str, level: str = "info", **fields: Any) -> None:
        record: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": level,
            "event": event,
        }
        if self._job:
            record["job"] = self._job
        record.update({k: v for k, v in fields.items() if v is not None})
        line = json.dumps(record, default=str, separators=(",", ":"))
        with self._lock:
            try:
                self._stream.write(line + "\n")
                self._stream.flush()
            except (OSError, ValueError):
                pass  # a closed stdout (the scheduler's log pipe went away) must not end the job

    def info(self, event: str, **fields: Any) -> None:
        self.emit(event, "info", **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self.emit(event, "warning", **fields)

    def error(self, event: str, **fields: Any) -> None:
        self.emit(event, "error", **fields)

    def progress(self, data: dict[str, Any]) -> None:
        """A pipeline event (``Event.as_dict()``), printed unless it repeats within the interval."""
        data = dict(data)
        data.pop("time", None)
        level = str(data.pop("level", "info"))
        key = (str(data.get("stage", "")), str(data.get("step", "")))
        now = time.monotonic()
        fraction = data.get("fraction")
        important = level != "info" or key != self._last_key or fraction in (0, 0.0, 1, 1.0)
        if not important and now - self._last_progress.get(key, 0.0) < self._interval:
            return
        self._last_progress[key] = now
        self._last_key = key
        self.emit("warning" if level == "warning" else "progress", level, **data)
