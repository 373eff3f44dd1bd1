"""``python -m workers.child JOB_FILE EVENTS_FD``: the pipeline itself, in a process of its own.

The supervisor (``workers.supervisor``) runs the job here rather than in its own process so
that whatever happens to the pipeline, something is left to record it: when the kernel's
out-of-memory killer (which picks the largest process, this one) or a segfault in a native
library ends the pipeline, the supervisor still writes a FAILED status naming the cause and
exits with the infrastructure code, instead of the container vanishing with 137 and a status
object stuck at INPROGRESS.

This process runs ``run_plan`` (or the ``OPTJOB_PIPELINE`` seam of the local worker), sends each
progress event and then exactly one outcome to the supervisor as JSON lines on ``EVENTS_FD``, and
turns SIGTERM into the pipeline's cancellation, which cleans up and publishes nothing partial.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, TextIO

from optjob.errors import JobCancelled, JobFailed, ToolchainMissing
from optjob.jobs.outcomes import internal_error_reason
from optjob.jobs.worker import load_pipeline
from optjob.pipeline.plan import Plan
from optjob.runtime.allocator import tune_allocator
from optjob.runtime.cancel import CancelToken
from optjob.runtime.events import Event, EventSink


class Channel:
    """JSON lines to the supervisor; events come from transfer threads too, hence the lock."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def send(self, kind: str, **fields: Any) -> None:
        line = json.dumps({"kind": kind, **fields}, default=str)
        with self._lock:
            try:
                self._stream.write(line + "\n")
                self._stream.flush()
            except (BrokenPipeError, ValueError):
                pass  # the supervisor is gone; finishing the cleanup still matters

    def event(self, event: Event) -> None:
        self.send("event", event=event.as_dict())


def run_job(job_file: Path, channel: Channel, cancel: CancelToken) -> int:
    job = json.loads(job_file.read_text(encoding="utf-8"))
    plan = Plan.model_validate(job["plan"])
    try:
        outcome = load_pipeline()(
            plan,
            work_dir=Path(job["work_dir"]),
            job_arn=job["job_arn"],
            events=EventSink(channel.event),
            cancel=cancel,
        )
    except JobCancelled as exc:
        channel.send("cancelled", reason=str(exc))
        return 0
    except ToolchainMissing as exc:
        channel.send("failed", category="host", reason=str(exc))
        return 0
    except JobFailed as exc:
        channel.send("failed", category=exc.category, reason=str(exc))
        return 0
    except MemoryError as exc:
        reason = f"out of memory in the pipeline ({exc or 'MemoryError'}); use a host with more memory"
        channel.send("failed", category="infrastructure", reason=reason)
        return 0
    except Exception as exc:  # noqa: BLE001 - a bug must still end the job FAILED, with a reason
        traceback.print_exc(file=sys.stderr)
        channel.send("failed", category="internal", reason=internal_error_reason(exc))
        return 0
    channel.send(
        "completed",
        recommended_image=outcome.recommended_image,
        warnings=list(outcome.warnings),
        published=list(outcome.published),
        metrics=outcome.metrics,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m workers.child JOB_FILE EVENTS_FD (started by optjob-worker)", file=sys.stderr)
        return 64
    tune_allocator()  # the supervisor's setting is not inherited: mallopt is per process
    cancel = CancelToken()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: cancel.cancel("stopped"))
    with os.fdopen(int(args[1]), "w", encoding="utf-8", buffering=1) as stream:
        return run_job(Path(args[0]), Channel(stream), cancel)


if __name__ == "__main__":
    sys.exit(main())
