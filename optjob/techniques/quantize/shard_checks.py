"""Per-shard verification on its own thread, so checking shard N overlaps quantizing shard N+1.

A streaming job used to quantize a shard, check it, and only then read the next: on the profiled
2.47 GB FP8 job the check (decode every weight, compare it with its source) had become the larger
half of the per-shard work once quantization got fast. Checks run here in arrival order on one
thread and their figures are merged for the gate. The first failure is kept and raised by
``finish``; after one, the checks not yet started are skipped. Shards are uploaded while they are
checked: the gate's verdict comes after the last shard either way, and nothing is a finished model
before the manifest, which a failed gate never writes (the uploads are rolled back).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from optjob.verify.tensors import TensorFigures, compare_shard, merge


class ShardChecker:
    def __init__(self, qconfig: Callable[[], dict[str, Any]], mode: Any) -> None:
        self._qconfig = qconfig
        self._mode = mode
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="optjob-check")
        self._futures: list[Future[None]] = []
        self._figures: list[TensorFigures] = []
        self._failed = threading.Event()
        self.seconds = 0.0

    def submit(self, source: Path, output: Path) -> None:
        for done in [f for f in self._futures if f.done()]:
            done.result()  # surface a failed check now rather than after the last shard
        self._futures.append(self._pool.submit(self._check, source, output))

    def _check(self, source: Path, output: Path) -> None:
        if self._failed.is_set():
            return
        started = time.monotonic()
        try:
            figures = compare_shard(source, output, self._qconfig(), mode=self._mode)
        except BaseException:
            self._failed.set()
            raise
        self.seconds += time.monotonic() - started
        self._figures.append(figures)

    def finish(self) -> TensorFigures | None:
        """Wait for every check; the merged figures (None if no shard was checked)."""
        try:
            for future in self._futures:
                future.result()
        finally:
            self._pool.shutdown(wait=True)
        return merge(self._figures) if self._figures else None

    def abort(self) -> None:
        """Drop the checks not started and wait for the running one (failure paths)."""
        self._failed.set()
        for future in self._futures:
            future.cancel()
        self._pool.shutdown(wait=True)
