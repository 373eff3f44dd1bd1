"""ModelCompilationConfig: TensorRT-LLM for CUDA targets, optimum-neuron (neuronx-cc) for inf2/trn1.

Planning checks what SageMaker's containers check (tensor-parallel degree required on Neuron and
dividing the device count, the quantization modes a TensorRT-LLM build accepts); the engine build
must run on the target's accelerator architecture, which the stage declares in ``needs``. On
Neuron, once the model's ``config.json`` is known, ``neuron_export`` gives the exact optimum-neuron
export (``neuron_plan``); requests optimum-neuron would refuse are refused with its reason.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from optjob.errors import InputError
from optjob.pipeline.env import env_to_properties, tensor_parallel_degree
from optjob.pipeline.stage import (
    PlanError,
    PlannedStage,
    StageContext,
    StageNeeds,
    StageResult,
    Technique,
    register,
)
from optjob.targets.catalog import InstanceSpec
from optjob.techniques._pending import driver_not_in_build, require_toolchain
from optjob.techniques.compile.neuron_plan import NeuronExportPlan, NeuronPlanError, NeuronRequest, plan_export

TRTLLM_QUANTIZE = ("awq", "fp8", "smoothquant")
NEURON_DTYPES = ("fp16", "bf16", "fp32")


def _positive_int(env: Mapping[str, str], name: str, default: int | None, *, path: str) -> int | None:
    value = env.get(name)
    if value is None:
        return default
    if not value.isdigit() or int(value) < 1:
        raise PlanError(f"{name}='{value}' at '{path}' must be a positive integer")
    return int(value)


@register
class CompilationTechnique(Technique):
    config_member = "ModelCompilationConfig"
    optimization_type = "Compilation"

    def plan(self, config: BaseModel, env: Mapping[str, str], target: InstanceSpec, *, path: str) -> PlannedStage:
        env = dict(env)
        image = getattr(config, "image", None)
        if target.family == "neuron":
            return self._plan_neuron(env, target, image, path=path)
        degree = tensor_parallel_degree(env, target, path=path) or 1
        quantize = env.get("OPTION_QUANTIZE")
        if quantize is not None and quantize not in TRTLLM_QUANTIZE:
            raise PlanError(
                f"OPTION_QUANTIZE='{quantize}' at '{path}' cannot be applied by a TensorRT-LLM build; "
                f"allowed: {', '.join(TRTLLM_QUANTIZE)}"
            )
        return PlannedStage(
            technique=self.config_member,
            optimization_type=self.optimization_type,
            engine="tensorrt-llm",
            params={
                "tensor_parallel_degree": degree,
                "quantize": quantize,
                "dtype": env.get("OPTION_DTYPE", "auto"),
            },
            env=env,
            image=image,
            image_framework="tensorrtllm",
            needs=StageNeeds(accelerator=True, toolchain="tensorrt_llm"),
            serving_properties={"engine": "MPI", **env_to_properties(env)},
        )

    def _plan_neuron(self, env: dict[str, str], target: InstanceSpec, image: str | None, *, path: str) -> PlannedStage:
        """The request's half of the export plan; the model's half comes with its config.json."""
        degree = tensor_parallel_degree(env, target, path=path, required=True)
        dtype = env.get("OPTION_DTYPE")
        if dtype is not None and dtype not in NEURON_DTYPES:
            raise PlanError(f"OPTION_DTYPE='{dtype}' at '{path}' is not one of {', '.join(NEURON_DTYPES)}")
        params = {
            "instance_type": target.instance_family,
            "tensor_parallel_degree": degree,
            "batch_size": _positive_int(env, "OPTION_MAX_ROLLING_BATCH_SIZE", 1, path=path),
            "n_positions": _positive_int(env, "OPTION_N_POSITIONS", None, path=path),
            "dtype": dtype,
            "optimize_level": _positive_int(env, "OPTION_NEURON_OPTIMIZE_LEVEL", None, path=path),
        }
        return PlannedStage(
            technique=self.config_member,
            optimization_type=self.optimization_type,
            engine="neuronx-cc",
            params=params,
            env=env,
            image=image,
            image_framework="neuronx",
            needs=StageNeeds(toolchain="neuronx_cc"),
            serving_properties={**env_to_properties(env), "option.model_id": "./optimized_model"},
        )

    def model_problems(self, stage: PlannedStage, config: Mapping[str, Any], target: InstanceSpec) -> list[str]:
        if stage.engine != "neuronx-cc":
            return []
        try:
            self.neuron_export(stage, config)
        except NeuronPlanError as exc:
            return [str(exc)]
        return []

    def model_plan_lines(self, stage: PlannedStage, config: Mapping[str, Any], target: InstanceSpec) -> list[str]:
        if stage.engine != "neuronx-cc":
            return []
        plan = self.neuron_export(stage, config)
        heads = plan.attention_sharding
        return [
            f"optimum-neuron {plan.neuron_config['optimum_neuron_version']} export for {plan.model_type}, "
            f"target {plan.target}:",
            "  " + " ".join(plan.cli_args),
            f"  neuron_config.json: {json.dumps(plan.neuron_config, sort_keys=True)}",
            f"  neuronx-cc {plan.neuron_config['neuronxcc_version']}: {plan.compiler_args}",
            f"  attention: {heads.strategy}, {heads.num_attention_heads} heads / {heads.num_key_value_heads} KV "
            f"heads after padding, {heads.heads_per_rank} / {heads.kv_heads_per_rank} per rank",
            *(f"  warning: {warning}" for warning in plan.warnings),
        ]

    @staticmethod
    def neuron_export(stage: PlannedStage, config: Mapping[str, Any]) -> NeuronExportPlan:
        """The exact optimum-neuron export for this stage and model (raises NeuronPlanError)."""
        params = stage.params
        plan = plan_export(
            config,
            NeuronRequest(
                instance_type=params["instance_type"],
                tensor_parallel_size=params["tensor_parallel_degree"],
                batch_size=params["batch_size"],
                sequence_length=params["n_positions"],
                dtype=params["dtype"],
            ),
        )
        level, fixed = params.get("optimize_level"), re.search(r" -O(\d)", plan.compiler_args)
        if level is not None and fixed is not None and level != int(fixed.group(1)):
            raise NeuronPlanError(
                f"OPTION_NEURON_OPTIMIZE_LEVEL={level}: optimum-neuron {plan.neuron_config['optimum_neuron_version']} "
                f"compiles {plan.model_type} at -O{fixed.group(1)} and takes no other level; remove the variable "
                f"or set it to {fixed.group(1)}"
            )
        return plan

    def run(self, stage: PlannedStage, ctx: StageContext) -> StageResult:
        if stage.engine == "neuronx-cc":
            # The model's half of the plan first: a refusal names the model's problem, not a missing SDK.
            try:
                self.neuron_export(stage, json.loads((ctx.input_dir / "config.json").read_text(encoding="utf-8")))
            except NeuronPlanError as exc:
                raise InputError(f"This model cannot be compiled for Neuron as requested: {exc}.") from None
            require_toolchain(
                "Neuron compilation",
                {
                    "neuronx_cc": "neuronx-cc from the AWS Neuron repository, not PyPI",
                    "optimum.neuron": "optimum-neuron[neuronx]",
                },
            )
        else:
            require_toolchain(
                "TensorRT-LLM compilation",
                {"tensorrt_llm": "tensorrt-llm from NVIDIA's package index, on a host with the target's GPU"},
            )
        raise driver_not_in_build(self.config_member, "compilation driver")
