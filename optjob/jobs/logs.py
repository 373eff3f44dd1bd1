"""Each job's log: one JSON object per line, appended by the service, the executor and the worker.

Several processes write the same file (the worker its progress, the executor the signals it sent
and how the worker ended), so every record is a single ``write`` of one whole line on a file
opened with O_APPEND, which POSIX keeps from interleaving. The reader tolerates a partial last
line (a writer mid-line) by waiting for its newline.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from optjob.redaction import redact_text
from optjob.runtime.events import Event


class JobLog:
    """Appends records to one job's JSON-lines log."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def write(self, stage: str, step: str, message: str = "", *, level: str = "info", **fields: Any) -> None:
        record: dict[str, Any] = {"time": round(time.time(), 3), "stage": stage, "step": step}
        if message:
            record["message"] = message
        if level != "info":
            record["level"] = level
        record.update({k: v for k, v in fields.items() if v is not None})
        self.append(record)

    def event(self, event: Event) -> None:
        record = event.as_dict()
        record["time"] = round(record["time"], 3)
        self.append(record)

    def append(self, record: dict[str, Any]) -> None:
        if "message" in record:  # a warning or event may quote a request's environment
            record = {**record, "message": redact_text(record["message"])}
        line = (json.dumps(record, default=str) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


def _parse(line: bytes) -> dict[str, Any]:
    text = line.decode(errors="replace").rstrip("\n")
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return {"message": text}
    return record if isinstance(record, dict) else {"message": text}


def follow(
    path: Path, *, done: Callable[[], bool], poll_s: float = 0.25, follow: bool = True
) -> Iterator[dict[str, Any]]:
    """Yield records from ``path``; with ``follow``, keep tailing until ``done()`` and the file is drained.

    ``done`` is checked *before* the final read, so records written just before the job turned
    terminal are never lost.
    """
    offset = 0
    pending = b""
    while True:
        finished = done() if follow else True
        try:
            with open(path, "rb") as handle:
                handle.seek(offset)
                chunk = handle.read()
        except FileNotFoundError:
            chunk = b""
        offset += len(chunk)
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.strip():
                yield _parse(line)
        if finished:
            if pending.strip():
                yield _parse(pending)
            return
        time.sleep(poll_s)


def format_record(record: dict[str, Any]) -> str:
    """One human line: time, level, stage/step, percentage, ETA, message."""
    moment = record.get("time")
    stamp = datetime.fromtimestamp(moment).strftime("%H:%M:%S") if isinstance(moment, int | float) else "--:--:--"
    parts = [stamp]
    level = record.get("level", "info")
    if level != "info":
        parts.append(level.upper())
    where = "/".join(str(record[k]) for k in ("stage", "step") if record.get(k))
    if where:
        parts.append(where)
    fraction = record.get("fraction")
    if isinstance(fraction, int | float):
        parts.append(f"{fraction * 100:.0f}%")
    eta = record.get("eta_s")
    if isinstance(eta, int | float):
        parts.append(f"eta {eta:.0f}s")
    if record.get("message"):
        parts.append(str(record["message"]))
    if record.get("traceback"):
        parts.append("\n" + str(record["traceback"]).rstrip())
    return "  ".join(parts)
