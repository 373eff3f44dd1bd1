"""Shared run-time guard for techniques whose planning is complete but whose driver is not in this build.

Planning (parameter checks against the target) is real for every technique, so requests are
accepted or rejected at Create exactly as they will be. Running one whose driver has not landed
ends the job FAILED with a reason that says what is missing, never a silent success.
"""

from __future__ import annotations

import importlib.util

from optjob.errors import InfrastructureError, ToolchainMissing


def require_toolchain(technique: str, modules: dict[str, str]) -> None:
    """Fail with ToolchainMissing naming every absent module and how to get it."""
    missing = [f"{module} ({how})" for module, how in modules.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ToolchainMissing(
            f"{technique} needs " + "; ".join(missing) + " on the worker host, and this host has none of it. "
            "Run the job on a worker that has it, or remove this OptimizationConfig from the request"
        )


def driver_not_in_build(technique: str, tracking: str) -> InfrastructureError:
    return InfrastructureError(
        f"{technique}: the toolchain is present but this optjob build does not drive it yet ({tracking}); "
        "nothing was published. Remove this OptimizationConfig from the request, or run the job with an optjob "
        "build that drives it"
    )
