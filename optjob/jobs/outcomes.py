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

import json
import re
import signal
from typing import Any

from optjob.errors import MAX_REASON, clip_words, first_line
from optjob.jobs.logs import JobLog
from optjob.jobs.store import ACTIVE_STATUSES, Store

MAX_FAILURE_REASON = MAX_REASON
_TRACEBACK = "Traceback (most recent call last)"
_TRACEBACK_LINE = re.compile(r'File "[^"]+", line \d+')
# A reason says what a person can do; one of these verbs is how it says it.
ACTION_WORDS = (
    "accept", "add", "allow", "ask", "attach", "change", "check", "choose", "configure", "create", "delete", "drop",
    "enable", "fix", "free", "give", "grant", "include", "increase", "install", "keep", "lower", "make", "move",
    "pass", "provide", "raise", "reduce", "remove", "rename", "report", "retry", "run", "see", "select", "set",
    "shorten", "split", "start", "try", "update", "upload", "use", "wait",
)  # fmt: skip


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


def died_reason(returncode: int | None, pid: int | str, *, last_output: str = "") -> str:
    """How a worker ended without recording a result, from its exit status (None: unknown).

    ``pid`` is the local worker's pid, or a phrase such as ``pid 17 on Ray node 127.0.0.2``.
    """
    pid = pid if isinstance(pid, str) else f"pid {pid}"
    if returncode is None:
        text = (
            f"worker process ({pid}) ended while no executor was watching it (the control process "
            f"had stopped), before it recorded a result; its exit status is unknown"
        )
    elif returncode < 0:
        number = -returncode
        text = f"worker process ({pid}) was killed by signal {number} ({signal_name(number)})"
        if number == signal.SIGKILL:
            text += "; when nobody sent it, this is usually the kernel's out-of-memory killer"
    else:
        text = f"worker process ({pid}) exited with code {returncode} before it recorded a result"
    text += "; see `optjob logs` for its last progress, then create the job again"
    if returncode == -signal.SIGKILL:
        text += " (on a host with more memory if it ran out)"
    if last_output:
        text += f". Last output: {clip_words(last_output, 300)}"
    return text


def node_lost_reason(lost: str, attempts: int, max_attempts: int) -> str:
    """A job whose node died on its last allowed attempt."""
    return (
        f"the node running the job was lost on attempt {attempts} of {max_attempts}: {lost}. No attempt "
        f"finished; the job log lists every attempt's node. Check the cluster's nodes, then create the job again "
        f"(it resumes from the shards already uploaded only within one job: a new job starts clean)"
    )


def interrupted_reason() -> str:
    return (
        "interrupted: the worker received SIGTERM but no StopOptimizationJob was requested (host "
        "shutdown or an outside kill?); partial output was discarded. Create the job again to retry"
    )


def internal_error_reason(exc: BaseException, *, job: str | None = None) -> str:
    """A bug's FailureReason: the exception's first line, and where its traceback is."""
    where = f"optjob logs {job}" if job else "the worker's log"
    return (
        f"internal error: {type(exc).__name__}: {first_line(exc, 400)}. This is a bug in optjob, not in the "
        f"request: the traceback is in the job log ({where}); report it with that log, then retry the job."
    )


def clip_reason(reason: str, *, job: str | None = None) -> str:
    """A FailureReason in SageMaker's form: one line, at most 1024 characters, never a traceback,
    never cut mid-word, ending a sentence. What did not fit is in the job log, which it names."""
    text = reason.split(_TRACEBACK)[0] if _TRACEBACK in reason else reason
    text = " ".join(text.split()) or "unknown error"
    if not text.endswith("."):
        text += "."
    if len(text) <= MAX_FAILURE_REASON:
        return text
    pointer = f"; the full text is in the job log (optjob logs {job})." if job else "; the full text is in the job log."
    body, _, last = text[:-1].rpartition(". ")
    advice = f" {last}." if body and len(last) <= 300 else ""  # the closing sentence says what to do: keep it
    body = body if advice else text
    return clip_words(body, MAX_FAILURE_REASON - len(pointer) - len(advice)) + pointer + advice


def reason_problems(reason: str) -> list[str]:
    """What keeps ``reason`` from being a FailureReason a person can act on (empty: none)."""
    problems = []
    if len(reason) > MAX_FAILURE_REASON:
        problems.append(f"longer than {MAX_FAILURE_REASON} characters ({len(reason)})")
    if "\n" in reason:
        problems.append("spans several lines")
    if _TRACEBACK in reason or _TRACEBACK_LINE.search(reason):
        problems.append("contains a traceback")
    if not reason.rstrip().endswith("."):
        problems.append("does not end a sentence")
    if re.search(r"\w\.\.\.", reason):
        problems.append("is cut mid-word")
    words = set(re.findall(r"[a-z]+", reason.lower()))
    if not words & set(ACTION_WORDS):
        problems.append("says nothing a person can do")
    return problems


def fail(
    store: Store,
    key: str,
    reason: str,
    *,
    expect: tuple[str, ...] = ACTIVE_STATUSES,
    category: str | None = None,
    where_pid: tuple[int | None, ...] | None = None,
    outcome: dict[str, Any] | None = None,
) -> bool:
    """Move the job ``key`` to FAILED with ``reason`` if its status is in ``expect`` (and, with
    ``where_pid``, its worker is one of those); log it if we did."""
    full = reason
    record = store.get(key)
    reason = clip_reason(reason, job=record.name if record else key)
    recorded = {"outcome_json": json.dumps(outcome)} if outcome else {}
    if not store.transition(key, expect=expect, to="FAILED", failure_reason=reason, where_pid=where_pid, **recorded):
        return False
    if record is not None:
        JobLog(record.log_path).write(
            "lifecycle",
            "FAILED",
            reason,
            level="error",
            category=category,
            full_reason=full if full != reason else None,
        )
    return True


def end_stopping(store: Store, key: str, note: str = "") -> bool:
    """Finish a STOPPING job: STOPPED after a Stop, FAILED (MaxRuntimeExceeded) after a timeout."""
    record = store.get(key)
    if record is None or record.status != "STOPPING":
        return False
    if record.stop_reason == "timeout":
        done = fail(store, key, timeout_reason(record.max_runtime_s), expect=("STOPPING",), category="timeout")
        if done and note:
            JobLog(record.log_path).write("lifecycle", "timeout", note)
        return done
    if not store.transition(key, expect=("STOPPING",), to="STOPPED"):
        return False
    JobLog(record.log_path).write("lifecycle", "STOPPED", note or "stopped; partial output discarded")
    return True
