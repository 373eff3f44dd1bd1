"""What a DeploymentInstanceType *has*: accelerator, count, memory, compute capability.

Loaded once from ``configs/instances.yaml`` into typed records. Everything that depends on the
target (which quantization scheme runs natively, whether bf16 exists, how much memory a shard
may use) asks this catalog rather than matching on instance names.
"""

from __future__ import annotations

from functools import cache
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from optjob.config_files import load_config


class InstanceSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    family: Literal["cuda", "neuron"]
    instance_family: str = Field(description="EC2 family, e.g. g6e or inf2")
    accelerator: str
    accelerator_count: int = Field(ge=1)
    memory_gib: float = Field(gt=0, description="memory per accelerator (per chip for Neuron)")
    compute_capability: str | None = None
    neuron_core: str | None = None
    neuron_cores: int | None = None
    fp8: bool
    bf16: bool

    @model_validator(mode="after")
    def _family_fields(self) -> InstanceSpec:
        if self.family == "cuda" and self.compute_capability is None:
            raise ValueError(f"{self.name}: a cuda instance needs compute_capability")
        if self.family == "neuron" and (self.neuron_core is None or self.neuron_cores is None):
            raise ValueError(f"{self.name}: a neuron instance needs neuron_core and neuron_cores")
        return self

    @property
    def capability(self) -> tuple[int, int] | None:
        """CUDA compute capability as a comparable tuple, e.g. (8, 9); None on Neuron."""
        if self.compute_capability is None:
            return None
        major, _, minor = self.compute_capability.partition(".")
        return int(major), int(minor or 0)

    @property
    def total_memory_gib(self) -> float:
        return self.memory_gib * self.accelerator_count

    def describe(self) -> str:
        detail = (
            f"sm_{self.compute_capability.replace('.', '')}"
            if self.compute_capability
            else f"{self.neuron_cores} NeuronCore-{self.neuron_core}"
        )
        return f"{self.accelerator_count} x {self.accelerator} ({self.memory_gib:g} GiB, {detail})"


@cache
def catalog() -> dict[str, InstanceSpec]:
    rows = load_config("instances.yaml")["instances"]
    return {name: InstanceSpec(name=name, **row) for name, row in rows.items()}


def instance(name: str) -> InstanceSpec:
    """The spec of one instance type; KeyError names the type and where to add it."""
    try:
        return catalog()[name]
    except KeyError:
        raise KeyError(f"instance type {name!r} is not in configs/instances.yaml") from None
