"""This process's memory figures, as jobs report them in their manifests."""

from __future__ import annotations

from typing import Any


def peak_rss_mib() -> float:
    """Peak resident set of this process (not its children) since it started, in MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mib() -> float:
    """Resident set of this process now, in MiB."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class PeakRss:
    """Samples this process's RSS on a thread while a block runs: the peak of one phase of a job
    (``ru_maxrss`` only knows the whole process's lifetime peak)."""

    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s = interval_s
        self.start_mib = self.peak_mib = 0.0
        self._stop: Any = None

    def __enter__(self) -> PeakRss:
        import threading

        self.start_mib = self.peak_mib = rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_mib = max(self.peak_mib, rss_mib())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, rss_mib())

    @property
    def above_start_mib(self) -> float:
        return max(0.0, self.peak_mib - self.start_mib)
