"""Why a job failed, sorted by who can fix it.

The category decides the worker's exit code (schedulers retry infrastructure failures, not
bad input) and prefixes nothing: the message itself is the FailureReason a person reads, so it
names the field or file at fault and what to do about it.
"""

from __future__ import annotations

from typing import Literal

FailureCategory = Literal["input", "infrastructure"]


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
