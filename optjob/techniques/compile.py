"""ModelCompilationConfig: TensorRT-LLM engines for CUDA targets, neuronx-cc for inf2/trn1.

Planning checks what SageMaker's containers check (tensor-parallel degree required on Neuron and
dividing the device count, the quantization modes a TensorRT-LLM build accepts); the engine build
must run on the target's accelerator architecture, which the stage declares in ``needs``.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel

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

TRTLLM_QUANTIZE = ("awq", "fp8", "smoothquant")
NEURON_DTYPES = ("fp16", "bf16", "fp32")


@register
class CompilationTechnique(Technique):
    config_member = "ModelCompilationConfig"
    optimization_type = "Compilation"

    def plan(
        self, config: BaseModel, env: Mapping[str, str], target: InstanceSpec, *, path: str
    ) -> PlannedStage:
        env = dict(env)
        image = getattr(config, "image", None)
        if target.family == "neuron":
            degree = tensor_parallel_degree(env, target, path=path, required=True)
            dtype = env.get("OPTION_DTYPE", "fp16")
            if dtype not in NEURON_DTYPES:
                raise PlanError(
                    f"OPTION_DTYPE='{dtype}' at '{path}' is not one of {', '.join(NEURON_DTYPES)}"
                )
            params = {
                "tensor_parallel_degree": degree,
                "n_positions": int(env.get("OPTION_N_POSITIONS", "128")),
                "dtype": dtype,
                "optimize_level": int(env.get("OPTION_NEURON_OPTIMIZE_LEVEL", "2")),
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

    def run(self, stage: PlannedStage, ctx: StageContext) -> StageResult:
        if stage.engine == "neuronx-cc":
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
