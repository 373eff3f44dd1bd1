"""Progress events: what a long job tells the person waiting for it.

Every long step (a download, a layer of calibration, an upload) reports through an
``EventSink``; the executor writes them to the job's log as JSON lines and keeps the latest in
the store, the worker prints them to stdout. Code that does work never prints on its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Event:
    """One progress report. ``fraction`` is 0..1 of ``stage`` when known; ``eta_s`` is derived."""

    stage: str
    step: str
    fraction: float | None = None
    message: str = ""
    eta_s: float | None = None
    level: str = "info"
    time: float = field(default_factory=time.time)
    fields: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        extra = data.pop("fields")
        data.update(extra)
        return {k: v for k, v in data.items() if v is not None and v != ""}


class EventSink:
    """Receives events; estimates ETA per stage from the fraction done and the time since it began."""

    def __init__(self, emit: Callable[[Event], None] | None = None) -> None:
        self._emit = emit
        self._stage_started: dict[str, float] = {}

    def __call__(
        self,
        stage: str,
        step: str,
        fraction: float | None = None,
        message: str = "",
        *,
        level: str = "info",
        **fields: Any,
    ) -> Event:
        now = time.time()
        started = self._stage_started.setdefault(stage, now)
        eta = None
        if fraction is not None and 0 < fraction < 1:
            eta = round((now - started) * (1 - fraction) / fraction, 1)
        event = Event(stage, step, fraction, message, eta, level, now, fields)
        if self._emit is not None:
            self._emit(event)
        return event

    def warning(self, stage: str, message: str, **fields: Any) -> Event:
        return self(stage, "warning", None, message, level="warning", **fields)


NULL_SINK = EventSink()
