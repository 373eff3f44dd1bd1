"""Where a job's time goes: seconds per named phase, summed across the threads that do the work.

A streaming job overlaps downloading, quantizing, checking, hashing and uploading, so its wall
time says nothing about the bottleneck. The consumer thread (the one that turns source tensors into
output tensors) charges every interval it spends to exactly one phase; ``wait_download`` and
``wait_upload`` are the intervals it sat idle because the network was behind. A user reads the
breakdown in the manifest and in ``optjob logs``: a large ``wait_download`` means S3 reads are the
limit, a large ``quantize`` means the CPU is. ``verify`` runs on a thread of its own beside the
consumer, so the phases can add up to more than the wall time; ``wait_verify`` is the consumer
waiting for it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

PHASES = ("wait_download", "quantize", "verify", "wait_verify", "hash", "spool", "wait_hash", "wait_upload")


class PhaseClock:
    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}
        self._lock = threading.Lock()
        self.started = time.monotonic()

    def add(self, phase: str, seconds: float) -> None:
        with self._lock:
            self._seconds[phase] = self._seconds.get(phase, 0.0) + seconds

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - began)

    def seconds(self) -> dict[str, float]:
        """Every phase's seconds (the known phases first, zero when unused), rounded for a manifest."""
        with self._lock:
            data = dict(self._seconds)
        ordered = {name: data.pop(name, 0.0) for name in PHASES}
        ordered.update(sorted(data.items()))
        return {name: round(value, 3) for name, value in ordered.items()}

    def summary(self) -> str:
        """One line for the job log: each phase's seconds and share of the wall time so far."""
        wall = max(time.monotonic() - self.started, 1e-9)
        parts = [
            f"{name} {value:.1f} s ({100 * value / wall:.0f} %)" for name, value in self.seconds().items() if value
        ]
        return f"{wall:.1f} s wall: " + ", ".join(parts)
