"""The layered environment of a stage, and the few OPTION_* keys every technique reads.

SageMaker passes technique parameters as LMI environment variables. Precedence, lowest first:
container defaults < OptimizationEnvironment < the config's OverrideEnvironment (reference §4.2).
``OPTION_X`` corresponds to ``option.x`` in serving.properties.
"""

from __future__ import annotations

from collections.abc import Mapping

from optjob.pipeline.stage import PlanError
from optjob.targets.catalog import InstanceSpec


def layer_env(*layers: Mapping[str, str] | None) -> dict[str, str]:
    """Merge environments; later layers win."""
    merged: dict[str, str] = {}
    for layer in layers:
        if layer:
            merged.update(layer)
    return merged


def env_to_properties(env: Mapping[str, str]) -> dict[str, str]:
    """``OPTION_MAX_MODEL_LEN`` -> ``option.max_model_len`` (``OPTION_ENTRYPOINT`` keeps LMI's casing)."""
    props = {}
    for key, value in env.items():
        if key == "OPTION_ENTRYPOINT":
            props["option.entryPoint"] = value
        elif key.startswith("OPTION_"):
            props["option." + key[len("OPTION_") :].lower()] = value
    return props


def tensor_parallel_degree(
    env: Mapping[str, str], target: InstanceSpec, *, path: str, required: bool = False
) -> int | None:
    """``OPTION_TENSOR_PARALLEL_DEGREE`` checked against the target's device count.

    On Neuron the degree counts NeuronCores; on CUDA it counts GPUs. It must divide that count
    so every device holds an equal shard.
    """
    raw = env.get("OPTION_TENSOR_PARALLEL_DEGREE")
    devices = target.neuron_cores if target.family == "neuron" else target.accelerator_count
    unit = "NeuronCores" if target.family == "neuron" else "GPUs"
    if raw is None or raw.strip() == "":
        if required:
            raise PlanError(
                f"OPTION_TENSOR_PARALLEL_DEGREE is required at '{path}' (set it in OptimizationEnvironment "
                f"or OverrideEnvironment); {target.name} has {devices} {unit}, so use a divisor of {devices}"
            )
        return None
    if raw.strip().lower() == "max":
        return devices
    try:
        degree = int(raw)
    except ValueError:
        raise PlanError(
            f"OPTION_TENSOR_PARALLEL_DEGREE='{raw}' at '{path}' is not an integer; "
            f"use a divisor of {devices} ({unit} on {target.name}) or 'max'"
        ) from None
    if degree < 1 or devices % degree != 0:
        divisors = [d for d in range(1, devices + 1) if devices % d == 0]
        raise PlanError(
            f"OPTION_TENSOR_PARALLEL_DEGREE={degree} at '{path}' must divide the {devices} {unit} of "
            f"{target.name}; allowed: {', '.join(map(str, divisors))}"
        )
    return degree
