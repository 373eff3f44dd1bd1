"""ModelCompilationConfig: Model Optimizer checkpoints for CUDA targets, optimum-neuron for inf2/trn1.

CUDA (``cuda_plan``, ``cuda_compile``): TensorRT-LLM has no engine build any more; its PyTorch
backend and vLLM load Model Optimizer's unified checkpoint, so compiling is quantizing with Model
Optimizer, exporting that checkpoint and writing the runtime limits. The checkpoint does not depend on
the GPU it was made on, so the stage needs no accelerator; the target's compute capability decides
which schemes are allowed. Neuron (``neuron_plan``, ``neuron_compile``): once the model's
``config.json`` is known, ``neuron_export`` gives the exact optimum-neuron export; requests
optimum-neuron would refuse are refused with its reason.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from optjob.errors import InputError
from optjob.package.serving import write_serving_properties
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
from optjob.techniques.compile import cuda_plan
from optjob.techniques.compile.cuda_compile import run_cuda_compile
from optjob.techniques.compile.cuda_plan import ENGINE as CUDA_ENGINE
from optjob.techniques.compile.cuda_plan import CudaCompileParams
from optjob.techniques.compile.neuron_cache import cache_root
from optjob.techniques.compile.neuron_compile import compile_cache_key, export_input, run_neuron_compile
from optjob.techniques.compile.neuron_env import TOOLCHAIN as NEURON_ENV_TOOLCHAIN
from optjob.techniques.compile.neuron_env import locate
from optjob.techniques.compile.neuron_env import present as neuron_env_present
from optjob.techniques.compile.neuron_layout import REQUIRED as ARTIFACT_FILES
from optjob.techniques.compile.neuron_layout import SHARDS
from optjob.techniques.compile.neuron_plan import (
    NeuronExportPlan,
    NeuronPlanError,
    NeuronRequest,
    neuron_rules,
    plan_export,
)

NEURON_DTYPES = ("fp16", "bf16", "fp32")
NEURON_PROPERTY_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def neuron_serving_environment(neuron_config: Mapping[str, Any]) -> dict[str, str]:
    """What the Hugging Face vLLM Neuron container (optimum-neuron's ``neuron serve``) reads: the model
    directory and the limits it was compiled for, which it checks against ``neuron_config.json``."""
    return {
        "SM_ON_MODEL": "/opt/ml/model",
        "SM_ON_TENSOR_PARALLEL_SIZE": str(neuron_config["tp_degree"]),
        "SM_ON_BATCH_SIZE": str(neuron_config["batch_size"]),
        "SM_ON_SEQUENCE_LENGTH": str(neuron_config["sequence_length"]),
    }


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
        params = cuda_plan.plan_params(env, target, degree, path=path)
        scheme = cuda_plan.cuda_rules().schemes[params.quantize]
        warnings = []
        if "vllm" not in scheme.consumers:
            warnings.append(
                f"OPTION_QUANTIZE={params.quantize}: TensorRT-LLM loads this Model Optimizer checkpoint; vLLM does not "
                "(it reads the ModelOpt FP8 and NVFP4 families only)"
            )
        return PlannedStage(
            technique=self.config_member,
            optimization_type=self.optimization_type,
            engine=CUDA_ENGINE,
            params=params.model_dump(),
            env=env,
            image=image,
            image_framework="tensorrtllm",
            needs=StageNeeds(calibration_data=scheme.calibrated),
            warnings=tuple(warnings),
            serving_properties={**env_to_properties(env), **cuda_plan.lmi_properties(params, params.dtype or "auto")},
        )

    def _plan_neuron(self, env: dict[str, str], target: InstanceSpec, image: str | None, *, path: str) -> PlannedStage:
        """The request's half of the export plan; the model's half comes with its config.json."""
        degree = tensor_parallel_degree(env, target, path=path, required=True)
        dtype = env.get("OPTION_DTYPE")
        if dtype is not None and dtype not in NEURON_DTYPES:
            raise PlanError(f"OPTION_DTYPE='{dtype}' at '{path}' is not one of {', '.join(NEURON_DTYPES)}")
        try:
            cache = cache_root(env, path=path)
        except InputError as exc:
            raise PlanError(str(exc)) from None
        params = {
            "instance_type": target.instance_family,
            "tensor_parallel_degree": degree,
            "batch_size": _positive_int(env, "OPTION_MAX_ROLLING_BATCH_SIZE", 1, path=path),
            "n_positions": _positive_int(env, "OPTION_N_POSITIONS", None, path=path),
            "dtype": dtype,
            "optimize_level": _positive_int(env, "OPTION_NEURON_OPTIMIZE_LEVEL", None, path=path),
            "compile_cache": cache.uri if cache else None,
        }
        return PlannedStage(
            technique=self.config_member,
            optimization_type=self.optimization_type,
            engine="neuronx-cc",
            params=params,
            env=env,
            image=image,
            image_framework="neuronx",
            needs=StageNeeds(toolchain=NEURON_ENV_TOOLCHAIN),
            serving_properties={**env_to_properties(env), "option.model_id": "./optimized_model"},
        )

    def model_problems(self, stage: PlannedStage, config: Mapping[str, Any], target: InstanceSpec) -> list[str]:
        if stage.engine == CUDA_ENGINE:
            problems = cuda_plan.model_problems(CudaCompileParams(**stage.params), config, target)
            if config.get("quantization_config"):
                method = config["quantization_config"].get("quant_method", "unknown")
                problems.insert(0, f"the model is already quantized (quantization_config.quant_method={method}); "
                                   "compile its unquantized source instead")  # fmt: skip
            return problems
        if stage.engine != "neuronx-cc":
            return []
        try:
            self.neuron_export(stage, config)
        except NeuronPlanError as exc:
            return [str(exc)]
        return []

    def model_plan_lines(self, stage: PlannedStage, config: Mapping[str, Any], target: InstanceSpec) -> list[str]:
        if stage.engine == CUDA_ENGINE:
            return cuda_plan.plan_lines(CudaCompileParams(**stage.params))
        if stage.engine != "neuronx-cc":
            return []
        plan = self.neuron_export(stage, config)
        heads = plan.attention_sharding
        last_rank = plan.neuron_config["tp_degree"] - 1
        return [
            f"optimum-neuron {plan.neuron_config['optimum_neuron_version']} export for {plan.model_type}, "
            f"target {plan.target}:",
            "  " + " ".join(plan.cli_args),
            f"  neuron_config.json: {json.dumps(plan.neuron_config, sort_keys=True)}",
            f"  neuronx-cc {plan.neuron_config['neuronxcc_version']}: {plan.compiler_args}",
            f"  attention: {heads.strategy}, {heads.num_attention_heads} heads / {heads.num_key_value_heads} KV "
            f"heads after padding, {heads.heads_per_rank} / {heads.kv_heads_per_rank} per rank",
            f"  artifact: {', '.join(ARTIFACT_FILES)}, then the weights: {SHARDS}/tp{{0..{last_rank}}}_sharded_"
            "checkpoint.safetensors (compiled here) or the model's own safetensors, sharded at load time (a "
            "compile-cache hit)",
            *self._cache_lines(stage, config, plan),
            *(f"  warning: {warning}" for warning in plan.warnings),
        ]

    @staticmethod
    def _cache_lines(stage: PlannedStage, config: Mapping[str, Any], plan: NeuronExportPlan) -> list[str]:
        uri = stage.params.get("compile_cache")
        if not uri:
            return ["  compile cache: none (set OPTION_NEURON_COMPILE_CACHE_URL=s3://... to share compiled models)"]
        rules = neuron_rules()
        if not neuron_env_present(os.environ, rules.optimum_neuron):
            return [
                f"  compile cache: {uri}; the entry key is optimum-neuron's own, computed in its environment, "
                "which this host lacks (scripts/neuron_env.sh builds it)"
            ]
        with tempfile.TemporaryDirectory() as scratch:
            (Path(scratch) / "config.json").write_text(json.dumps(dict(config)), encoding="utf-8")
            model = export_input(Path(scratch), Path(scratch) / "export", plan.export_dtype)
            key, _ = compile_cache_key(locate(os.environ, rules.optimum_neuron), model, plan, model_id="optjob/JOB")
        return [
            f"  compile cache: {uri}; looks up {key.registry_dir()}*.json for this neuron config, stores the "
            f"compiled model under {key.artifact_prefix('<entry hash>')}"
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
            return self._run_neuron(stage, ctx)
        if stage.engine == CUDA_ENGINE:
            config = json.loads((ctx.input_dir / "config.json").read_text(encoding="utf-8"))
            problems = self.model_problems(stage, config, ctx.target)
            if problems:
                raise InputError(f"This model cannot be compiled as requested: {problems[0]}.")
            return run_cuda_compile(CudaCompileParams(**stage.params), stage, ctx)
        raise ValueError(f"the planner chose compilation engine {stage.engine!r}, which no code runs")

    def _run_neuron(self, stage: PlannedStage, ctx: StageContext) -> StageResult:
        # The model's half of the plan first: a refusal names the model's problem, not a missing SDK.
        try:
            plan = self.neuron_export(stage, json.loads((ctx.input_dir / "config.json").read_text(encoding="utf-8")))
        except NeuronPlanError as exc:
            raise InputError(f"This model cannot be compiled for Neuron as requested: {exc}.") from None
        result = run_neuron_compile(plan, ctx)
        config = plan.neuron_config
        serving = {
            **stage.serving_properties,
            "option.tensor_parallel_degree": str(config["tp_degree"]),
            "option.n_positions": str(config["sequence_length"]),
            "option.max_rolling_batch_size": str(config["batch_size"]),
            "option.dtype": NEURON_PROPERTY_DTYPES[plan.export_dtype],
        }
        serve_env = neuron_serving_environment(config)
        write_serving_properties(
            ctx.output_dir,
            serving,
            comments=[
                f"Compiled by optimum-neuron {config['optimum_neuron_version']} with neuronx-cc "
                f"{config['neuronxcc_version']} for {plan.target}; serve it where both match.",
                "Hugging Face vLLM Neuron image (the recommended image) takes the same limits as environment:",
                " ".join(f"{k}={v}" for k, v in serve_env.items()),
            ],
        )
        result.metrics["serving_environment"] = serve_env
        result.warnings.extend(w for w in plan.warnings if w not in result.warnings)
        return result
