"""Can this host run this plan? Decided from what each stage declares it needs, never from its name.

Each planned stage carries ``needs`` (``optjob.pipeline.stage.StageNeeds``): whether it must run
on an accelerator, and which external toolchain it drives. The rules:

* a stage that needs an accelerator for a CUDA target needs at least one NVIDIA GPU here (CUDA
  compilation does not: Model Optimizer's checkpoint does not depend on the GPU it was made on);
* a stage that needs an accelerator for a Neuron target needs a Neuron device here;
* a stage that drives a toolchain needs it here (neuronx-cc compiles on any x86 host, so Neuron
  compilation needs optimum-neuron's environment, not a device);
* everything else (data-free FP8, checkpoint conversion, sharding) runs on any host, CPU included.

Refusing up front turns "the scheduler put the job on the wrong host" into one clear FailureReason
and exit code 69 before any download, instead of a failure an hour in.
"""

from __future__ import annotations

from collections.abc import Callable

from optjob.pipeline.plan import Plan
from optjob.pipeline.stage import PlannedStage
from workers.host import HostInfo, toolchain_present

# How a person calls each engine; anything not listed is "<OptimizationType> (<engine>)".
_ENGINE_LABELS = {
    "modelopt": "CUDA compilation (Model Optimizer)",
    "neuronx-cc": "Neuron compilation",
}
_TOOLCHAIN_HINTS = {
    "neuron_env": "optimum-neuron's environment (OPTJOB_NEURON_ENV); use the Neuron worker image built from "
    "Dockerfile.neuron, or scripts/neuron_env.sh where compile-cache hits are enough",
}


def stage_label(stage: PlannedStage) -> str:
    return _ENGINE_LABELS.get(stage.engine, f"{stage.optimization_type} ({stage.engine})")


def _gpu_problem(stage: PlannedStage, plan: Plan, host: HostInfo) -> str | None:
    target = plan.target
    if host.gpus:
        return None
    return (
        f"{stage_label(stage)} for {target.name} ({target.accelerator_count} x {target.accelerator}, "
        f"sm_{(target.compute_capability or '').replace('.', '')}) needs an NVIDIA GPU on this host; "
        f"found: {host.summary()}"
    )


def _neuron_problem(stage: PlannedStage, plan: Plan, host: HostInfo) -> str | None:
    if host.neuron_devices:
        return None
    target = plan.target
    return (
        f"{stage_label(stage)} for {target.name} ({target.accelerator_count} x {target.accelerator}) needs "
        f"a Neuron device on this host; found: {host.summary()}"
    )


def refusal(plan: Plan, host: HostInfo, *, has_toolchain: Callable[[str], bool] = toolchain_present) -> str | None:
    """Why this host cannot run ``plan`` (a FailureReason naming what is missing), or None if it can."""
    problems: list[str] = []
    for stage in plan.stages:
        needs = stage.needs
        if needs.accelerator:
            check = _neuron_problem if plan.target.family == "neuron" else _gpu_problem
            problem = check(stage, plan, host)
            if problem:
                problems.append(problem)
                continue  # the toolchain is moot on the wrong hardware
        if needs.toolchain and not has_toolchain(needs.toolchain):
            hint = _TOOLCHAIN_HINTS.get(needs.toolchain, "install it in the worker image")
            problems.append(
                f"{stage_label(stage)} for {plan.target.name} drives {needs.toolchain}, which is not installed "
                f"on this host ({hint})"
            )
    if not problems:
        return None
    return "This host cannot run the job: " + "; ".join(problems) + ". Run it on a host that has what is missing."
