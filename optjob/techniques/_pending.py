"""Shared run-time guard for techniques whose planning is complete but whose driver is not in this build.

Planning (parameter checks against the target) is real for every technique, so requests are
accepted or rejected at Create exactly as they will be. Running one whose driver has not landed
ends the job FAILED with a reason that says what is missing, never a silent success.
"""

from __future__ import annotations

from optjob.errors import InfrastructureError


def driver_not_in_build(technique: str, tracking: str) -> InfrastructureError:
    return InfrastructureError(
        f"{technique}: the toolchain is present but this optjob build does not drive it yet ({tracking}); "
        "nothing was published. Remove this OptimizationConfig from the request, or run the job with an optjob "
        "build that drives it"
    )
