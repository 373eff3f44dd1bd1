"""Run an external tool (a compiler, another library's CLI) as part of a stage.

The tool gets its own process group, so a Stop reaches everything it started (neuronx-cc forks
workers): on cancellation the group gets SIGTERM, then SIGKILL when it outlives the grace period,
and the stage raises ``JobCancelled``. Its output is read on a helper thread and every line becomes
a job event on the caller's thread (event sinks need not be thread-safe); the last lines are kept
for the FailureReason when it exits non-zero.
"""

from __future__ import annotations

import collections
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from optjob.errors import JobCancelled
from optjob.runtime.cancel import CancelToken
from optjob.runtime.events import EventSink

_POLL_S = 0.1
_KEEP_LINES = 40


@dataclass
class ToolRun:
    """How a tool ended: its exit status, the wall time and its last output lines."""

    returncode: int
    seconds: float
    tail: list[str]


def _terminate(process: subprocess.Popen[str], grace_s: float) -> None:
    """SIGTERM to the tool's process group, SIGKILL when it is still there after ``grace_s``."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_tool(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path,
    events: EventSink,
    cancel: CancelToken,
    stage: str,
    step: str,
    grace_s: float = 30.0,
) -> ToolRun:
    """Run ``argv`` to completion, streaming its output as events; raises JobCancelled on Stop."""
    started = time.monotonic()
    process = subprocess.Popen(
        list(argv),
        cwd=cwd,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
        start_new_session=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    reader = threading.Thread(target=pump, name=f"{step}-output", daemon=True)
    reader.start()
    tail: collections.deque[str] = collections.deque(maxlen=_KEEP_LINES)
    finished = False
    try:
        while not finished:
            if cancel.cancelled:
                _terminate(process, grace_s)
                raise JobCancelled(cancel.reason or "stopped")
            try:
                line = lines.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if line is None:
                finished = True
            elif line.strip():
                tail.append(line)
                events(stage, step, None, line)
        returncode = process.wait()
    finally:
        if process.poll() is None:
            _terminate(process, grace_s)
        reader.join(timeout=5)
    return ToolRun(returncode=returncode, seconds=round(time.monotonic() - started, 2), tail=list(tail))
