"""Cooperative cancellation: long loops ask the token between units of work.

SIGTERM (Stop, a timeout, a scheduler) sets the token; the work notices at its next check,
raises ``JobCancelled``, and the runner cleans up before the grace period ends.
"""

from __future__ import annotations

import threading

from optjob.errors import JobCancelled


class CancelToken:
    def __init__(self) -> None:
        self._event = threading.Event()
        self._children: list[CancelToken] = []
        self._lock = threading.Lock()
        self.reason = ""

    def cancel(self, reason: str = "stopped") -> None:
        with self._lock:
            self.reason = self.reason or reason
            self._event.set()
            children = list(self._children)
        for child in children:
            child.cancel(reason)

    def child(self) -> CancelToken:
        """A token cancelled with this one that can also be cancelled alone (to end one helper thread)."""
        token = CancelToken()
        with self._lock:
            self._children.append(token)
            cancelled = self._event.is_set()
        if cancelled:
            token.cancel(self.reason)
        return token

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise JobCancelled(self.reason or "stopped")

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True as soon as cancellation is requested."""
        return self._event.wait(seconds)
