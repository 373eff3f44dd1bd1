"""The worker's exit status: the one thing every batch scheduler reads to decide whether to retry.

The codes follow BSD ``sysexits.h`` for failures and the shell's 128+signal convention for a
stop, and deliberately avoid 1 and 2: Python exits 1 on an uncaught exception and 2 on a
command-line error, so neither can be told apart from a job outcome. 137 (128+SIGKILL) is never
returned by the worker itself; a scheduler sees it when the container was killed (the kernel's
out-of-memory killer, or SIGKILL after the grace period) and should treat it as infrastructure.

Codes (``TABLE`` below is the same list, for docs and tests):

* 0   COMPLETED: the model and its manifest are published.
* 64  usage error, no status written: no spec given, unknown option.
* 65  FAILED, input: invalid spec, gated model without AcceptEula, bad checkpoint, accuracy gate,
      MaxRuntimeExceeded. Retrying the same spec fails the same way.
* 69  FAILED, host unsuitable: no GPU, the wrong GPU, no Neuron device, or a missing toolchain
      (TensorRT-LLM, neuronx-cc). Retry only on another kind of host.
* 70  FAILED, internal error: a bug in optjob.
* 75  FAILED, infrastructure: S3 unreachable, out of memory, the pipeline process was killed. Retry.
* 143 STOPPED: SIGTERM/SIGINT (scheduler cancel, eviction) or StopOptimizationJob.
"""

from __future__ import annotations

from typing import Literal

EXIT_COMPLETED = 0
EXIT_USAGE = 64
EXIT_INPUT = 65
EXIT_HOST = 69
EXIT_INTERNAL = 70
EXIT_INFRASTRUCTURE = 75
EXIT_STOPPED = 143
EXIT_KILLED = 137  # never returned by us; what a scheduler sees after SIGKILL / the OOM killer

Category = Literal["input", "host", "internal", "infrastructure"]

FAILURE_CODES: dict[str, int] = {
    "input": EXIT_INPUT,
    "host": EXIT_HOST,
    "internal": EXIT_INTERNAL,
    "infrastructure": EXIT_INFRASTRUCTURE,
}

# Machine-readable form of the table above, used by docs and by the manifest tests.
TABLE: tuple[tuple[int, str, str, str], ...] = (
    (EXIT_COMPLETED, "COMPLETED", "the model and optjob-manifest.json are published", "no"),
    (EXIT_USAGE, "(no status)", "no spec given or a bad command line", "no"),
    (EXIT_INPUT, "FAILED", "bad input: invalid spec, gated model without AcceptEula, bad checkpoint, "
     "accuracy gate, MaxRuntimeExceeded", "no"),
    (EXIT_HOST, "FAILED", "this host lacks the accelerator or toolchain the technique needs", "on another host"),
    (EXIT_INTERNAL, "FAILED", "internal error (a bug in optjob)", "no"),
    (EXIT_INFRASTRUCTURE, "FAILED", "infrastructure: S3, out of memory, pipeline process killed", "yes"),
    (EXIT_STOPPED, "STOPPED", "SIGTERM/SIGINT (scheduler cancel, eviction) or StopOptimizationJob", "no"),
)  # fmt: skip

RETRYABLE = frozenset({EXIT_INFRASTRUCTURE, EXIT_KILLED})


def for_failure(category: str) -> int:
    """The exit code of a FAILED job by who can fix it; unknown categories count as internal."""
    return FAILURE_CODES.get(category, EXIT_INTERNAL)
