"""Why a job failed, sorted by who can fix it.

The category decides the worker's exit code (schedulers retry infrastructure failures, not
bad input) and prefixes nothing: the message itself is the FailureReason a person reads, so it
names the field or file at fault and what to do about it.
"""

from __future__ import annotations

from typing import Literal

FailureCategory = Literal["input", "infrastructure"]

MAX_REASON = 1024  # SageMaker's limit on FailureReason


def clip_words(text: str, limit: int) -> str:
    """``text`` within ``limit`` characters, cut at a word boundary and marked with an ellipsis."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[: max(0, limit - 4)].rsplit(" ", 1)[0].rstrip(",;:")
    return f"{cut} ..."


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's first line, clipped at a word: what a one-line reason quotes of it."""
    return clip_words((str(exc).strip().splitlines() or [""])[0], limit)


def reason_sentence(main: str, *, detail: str = "", limit: int = MAX_REASON) -> str:
    """A FailureReason: ``main`` (what failed, what to do) whole, then as much of ``detail`` as fits.

    The action must survive: callers put the long, optional part (a list of figures) in ``detail``,
    which is what gets shortened or dropped; only a ``main`` longer than the limit is clipped, at a word.
    """
    main = " ".join(main.split())
    detail = " ".join(detail.split())
    if len(main) > limit:
        return clip_words(main, limit)
    room = limit - len(main) - 1
    if detail and room > 20:
        return f"{main} {clip_words(detail, room)}"
    return main


class JobFailed(Exception):
    """A job cannot finish; ``str(exc)`` is the FailureReason shown by DescribeOptimizationJob."""

    category: FailureCategory = "input"


class InputError(JobFailed):
    """The request, the model or the data is at fault: retrying the same job fails the same way."""

    category = "input"


class VerificationFailed(InputError):
    """The optimized model fell below the accuracy gate; nothing was published."""


class InfrastructureError(JobFailed):
    """Storage, memory or the host is at fault: the same job may succeed when retried."""

    category = "infrastructure"


class ToolchainMissing(InfrastructureError):
    """The host lacks a compiler or runtime the technique drives (TensorRT-LLM, neuronx-cc, a GPU)."""


class JobCancelled(Exception):
    """The job was asked to stop (StopOptimizationJob, SIGTERM, or its MaxRuntimeInSeconds)."""
