"""How a job ends: the terminal writes and FailureReason texts shared by the worker and executor.

Both processes can end a job (the worker records its own result; the executor settles a worker
that died or was SIGKILLed), so the rules live here once: a Stop's outcome is STOPPED, a
MaxRuntimeInSeconds stop's outcome is FAILED with a ``MaxRuntimeExceeded:`` reason, and every
write is a compare-and-set on the status, so whichever process gets there first wins and the
other changes nothing.

Reasons start with what happened and end with what to do; the ``CapacityError:`` prefix is a
contract (the SageMaker SDK raises ``CapacityError`` when the reason contains it) and the
``MaxRuntimeExceeded:`` prefix mirrors SageMaker's secondary status name for the same event.
"""

from __future__ import annotations

import signal

from optjob.jobs.logs import JobLog
from optjob.jobs.store import ACTIVE_STATUSES, Store

MAX_FAILURE_REASON = 1024


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def timeout_reason(max_runtime_s: float | None) -> str:
    limit = f"{max_runtime_s:g} s" if max_runtime_s is not None else "its limit"
    return (
        f"MaxRuntimeExceeded: the job ran longer than StoppingCondition.MaxRuntimeInSeconds ({limit}) "
        f"and was stopped; partial output was discarded. Raise MaxRuntimeInSeconds and run it again"
    )


def capacity_reason(max_pending_s: float | None, slots: int) -> str:
    return (
        f"CapacityError: no executor slot became free within StoppingCondition.MaxPendingTimeInSeconds "
        f"({max_pending_s or 0:g} s); this host runs {slots} job(s) at once (OPTJOB_EXECUTOR_SLOTS). "
        f"Retry later or raise the slot count"
    )


def died_reason(returncode: int | None, pid: int, *, last_output: str = "") -> str:
    """How a worker ended without recording a result, from its exit status (None: unknown)."""
    if returncode is None:
        text = (
            f"worker process (pid {pid}) ended while no executor was watching it (the control process "
            f"had stopped), before it recorded a result; its exit status is unknown"
        )
    elif returncode < 0:
        number = -returncode
        text = f"worker process (pid {pid}) was killed by signal {number} ({signal_name(number)})"
        if number == signal.SIGKILL:
            text += "; when nobody sent it, this is usually the kernel's out-of-memory killer"
    else:
        text = f"worker process (pid {pid}) exited with code {returncode} before it recorded a result"
    text += "; see `optjob logs` for its last progress"
    if last_output:
        text += f". Last output: {last_output}"
    return text


def interrupted_reason() -> str:
    return (
        "interrupted: the worker received SIGTERM but no StopOptimizationJob was requested (host "
        "shutdown or an outside kill?); partial output was discarded. Create the job again to retry"
    )


def clip_reason(reason: str) -> str:
    """FailureReason is at most 1024 characters; keep the start, which names the cause."""
    reason = reason.strip() or "unknown error"
    return reason if len(reason) <= MAX_FAILURE_REASON else reason[: MAX_FAILURE_REASON - 3] + "..."


def fail(
    store: Store, name: str, reason: str, *, expect: tuple[str, ...] = ACTIVE_STATUSES, category: str | None = None
) -> bool:
    """Move the job to FAILED with ``reason`` if its status is in ``expect``; log it if we did."""
    reason = clip_reason(reason)
    if not store.transition(name, expect=expect, to="FAILED", failure_reason=reason):
        return False
    record = store.get(name)
    if record is not None:
        JobLog(record.log_path).write("lifecycle", "FAILED", reason, level="error", category=category)
    return True


def end_stopping(store: Store, name: str, note: str = "") -> bool:
    """Finish a STOPPING job: STOPPED after a Stop, FAILED (MaxRuntimeExceeded) after a timeout."""
    record = store.get(name)
    if record is None or record.status != "STOPPING":
        return False
    if record.stop_reason == "timeout":
        done = fail(store, name, timeout_reason(record.max_runtime_s), expect=("STOPPING",), category="timeout")
        if done and note:
            JobLog(record.log_path).write("lifecycle", "timeout", note)
        return done
    if not store.transition(name, expect=("STOPPING",), to="STOPPED"):
        return False
    JobLog(record.log_path).write("lifecycle", "STOPPED", note or "stopped; partial output discarded")
    return True
