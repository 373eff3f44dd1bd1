"""Where a job may run on a Ray cluster: its plan's stage needs as one resource request, and why no node fits.

The request is the union of what the plan's stages declare (``StageNeeds``), mapped by the rules in
``configs/ray.yaml``: a CPU for every job, memory by whether any stage holds the whole model, a GPU
(and the target's GPU type) when a stage needs an accelerator, a custom resource per external
toolchain. A job holds the whole request for its life because one worker runs its stages in order.

``missing`` answers the one question Ray's scheduler does not: a request that no live node could
*ever* meet waits forever in Ray, so the executor fails it at once, naming what is missing.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from optjob.config_files import load_config
from optjob.pipeline.plan import Plan

MIB = 2**20


class AcceleratorRule(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    num_gpus: float = Field(1, ge=0)
    by_target_type: bool = True


class RayRules(BaseModel):
    """``configs/ray.yaml``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    namespace: str
    job: dict[str, float]
    memory_mib: dict[str, int]
    accelerator: AcceleratorRule
    toolchains: dict[str, dict[str, float]] = Field(default_factory=dict)
    retries: dict[str, int]
    poll_timeout_s: float = Field(10, gt=0)

    @property
    def max_attempts(self) -> int:
        return max(1, int(self.retries.get("max_attempts", 1)))


@cache
def ray_rules() -> RayRules:
    return RayRules.model_validate(load_config("ray.yaml"))


class ResourceRequest(BaseModel):
    """What one job asks Ray for, in Ray's own resource names (CPU, GPU, memory in bytes, custom)."""

    model_config = ConfigDict(frozen=True)

    amounts: dict[str, float]
    why: dict[str, str] = Field(default_factory=dict, description="resource -> the stage need that asked for it")

    def actor_options(self) -> dict[str, Any]:
        """Keyword arguments for ``ActorClass.options``."""
        custom = {k: v for k, v in self.amounts.items() if k not in ("CPU", "GPU", "memory")}
        options: dict[str, Any] = {"num_cpus": self.amounts.get("CPU", 0), "num_gpus": self.amounts.get("GPU", 0)}
        if self.amounts.get("memory"):
            options["memory"] = int(self.amounts["memory"])
        if custom:
            options["resources"] = custom
        return options

    def describe(self) -> str:
        parts = []
        for name, amount in sorted(self.amounts.items()):
            shown = f"{amount / 2**30:g} GiB" if name == "memory" else f"{amount:g}"
            parts.append(f"{name}: {shown}")
        return "{" + ", ".join(parts) + "}"


def job_request(plan: Plan, rules: RayRules | None = None) -> ResourceRequest:
    rules = rules or ray_rules()
    amounts: dict[str, float] = {"CPU": float(rules.job.get("num_cpus", 1))}
    why = {"CPU": "every job's worker process"}
    whole = any(stage.needs.whole_model_in_memory for stage in plan.stages)
    memory_mib = rules.memory_mib["whole_model" if whole else "streaming"]
    if memory_mib:
        amounts["memory"] = float(memory_mib * MIB)
        why["memory"] = "a stage loads the whole model" if whole else "streaming stages"
    for stage in plan.stages:
        if stage.needs.accelerator and rules.accelerator.num_gpus:
            amounts["GPU"] = max(amounts.get("GPU", 0), rules.accelerator.num_gpus)
            why["GPU"] = f"{stage.optimization_type} needs an accelerator"
            if rules.accelerator.by_target_type and plan.target.family == "cuda":
                name = f"accelerator_type:{plan.target.accelerator}"
                amounts[name] = 0.001  # Ray's convention: a type label is requested in a tiny amount
                why[name] = f"{stage.optimization_type} needs the target's own GPU ({plan.target.accelerator})"
        if stage.needs.toolchain:
            for name, amount in rules.toolchains.get(stage.needs.toolchain, {}).items():
                amounts[name] = max(amounts.get(name, 0), amount)
                why[name] = f"{stage.optimization_type} drives {stage.needs.toolchain}"
    return ResourceRequest(amounts=amounts, why=why)


def missing(request: ResourceRequest, nodes: list[dict[str, Any]]) -> str | None:
    """Why no live node can ever run ``request`` (``nodes`` as ``ray.nodes()`` lists them), or None."""
    alive = [node for node in nodes if node.get("Alive")]
    if not alive:
        return "the Ray cluster has no live node"
    shortfalls: list[str] = []
    lacking: set[str] | None = None  # what every live node lacks
    for node in alive:
        totals = node.get("Resources") or {}
        short = {name for name, amount in request.amounts.items() if totals.get(name, 0) < amount}
        if not short:
            return None
        shortfalls.append(f"{node.get('NodeManagerAddress', '?')} lacks {', '.join(sorted(short))}")
        lacking = short if lacking is None else lacking & short
    named = ", ".join(f"{name} ({request.why.get(name, 'requested')})" for name in sorted(lacking or ()))
    named = named or "one node with all of them"
    return (
        f"no node of the Ray cluster has {request.describe()}; missing everywhere: {named}. "
        f"Nodes: {'; '.join(shortfalls)}. Add a node that advertises them (ray start --resources) or change the job"
    )
