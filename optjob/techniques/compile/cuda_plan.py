"""CUDA compilation, planned: which Model Optimizer recipe, for which GPUs, with which runtime limits.

TensorRT-LLM no longer builds engines; its PyTorch backend (and vLLM, for the FP8 and NVFP4
families) loads Model Optimizer's unified Hugging Face checkpoint directly. So a CUDA compile job is
"quantize with Model Optimizer, export the unified checkpoint, write the runtime configuration an
engine used to carry". The rules (schemes, the compute capability each needs, LMI's default limits)
are data in ``configs/cuda_compile.yaml``; this module applies them at Create and, for the parts that
need the model's ``config.json``, when it arrives.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from typing import Any

from pydantic import BaseModel, ConfigDict

from optjob.config_files import load_config
from optjob.pipeline.stage import PlanError
from optjob.targets.catalog import InstanceSpec, catalog

ENGINE = "modelopt"


class SchemeRule(BaseModel):
    model_config = ConfigDict(frozen=True)

    description: str
    min_compute_capability: str
    calibrated: bool
    consumers: list[str]
    modelopt_config: str | None = None
    quant_algo: str | None = None
    group_size: int | None = None


class CudaCompileRules(BaseModel):
    model_config = ConfigDict(frozen=True)

    modelopt: str
    schemes: dict[str, SchemeRule]
    kv_cache: dict[str, dict[str, str]]
    runtime_defaults: dict[str, float]
    dtypes: dict[str, str | None]


@cache
def cuda_rules() -> CudaCompileRules:
    return CudaCompileRules.model_validate(load_config("cuda_compile.yaml"))


class CudaCompileParams(BaseModel):
    """The resolved OPTION_* inputs of one CUDA compile stage (what the plan records)."""

    model_config = ConfigDict(frozen=True)

    quantize: str
    kv_cache_quant: str | None
    tensor_parallel_degree: int
    max_batch_size: int
    max_input_len: int
    max_output_len: int
    max_num_tokens: int
    dtype: str | None  # torch dtype name; None keeps the source's
    calib_dataset: str | None
    calib_size: int


def _cc(value: str | None) -> tuple[int, ...]:
    return tuple(int(part) for part in (value or "0").split("."))


def instance_families_with(min_cc: str) -> list[str]:
    """CUDA instance families whose GPUs reach ``min_cc``, for the refusal message."""
    found = {
        spec.instance_family
        for spec in catalog().values()
        if spec.family == "cuda" and _cc(spec.compute_capability) >= _cc(min_cc)
    }
    return sorted(found)


def _check_capability(what: str, min_cc: str, target: InstanceSpec, path: str) -> None:
    if _cc(target.compute_capability) >= _cc(min_cc):
        return
    families = instance_families_with(min_cc)
    raise PlanError(
        f"{what} at '{path}' needs GPUs of compute capability {min_cc} or newer, and {target.name} has "
        f"{target.accelerator} (compute capability {target.compute_capability}); use one of the instance "
        f"families {', '.join(families)}, or another OPTION_QUANTIZE"
    )


def _positive(env: Mapping[str, str], name: str, default: int, path: str) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise PlanError(f"{name}='{raw}' at '{path}' must be a positive integer")
    return int(raw)


def plan_params(env: Mapping[str, str], target: InstanceSpec, degree: int, *, path: str) -> CudaCompileParams:
    """OPTION_* -> parameters, refusing what the target's GPUs cannot run (raises PlanError)."""
    rules = cuda_rules()
    quantize = (env.get("OPTION_QUANTIZE") or "none").lower()
    scheme = rules.schemes.get(quantize)
    if scheme is None:
        raise PlanError(
            f"OPTION_QUANTIZE='{env.get('OPTION_QUANTIZE')}' at '{path}' is not a Model Optimizer scheme optjob "
            f"compiles; allowed: {', '.join(rules.schemes)}"
        )
    _check_capability(f"OPTION_QUANTIZE={quantize} ({scheme.description})", scheme.min_compute_capability, target,
                      path)  # fmt: skip
    kv = env.get("OPTION_KV_CACHE_QUANT")
    if kv is not None:
        kv = kv.lower()
        if kv not in rules.kv_cache:
            raise PlanError(
                f"OPTION_KV_CACHE_QUANT='{kv}' at '{path}' is not supported; allowed: {', '.join(rules.kv_cache)}"
            )
        _check_capability(f"OPTION_KV_CACHE_QUANT={kv}", rules.kv_cache[kv]["min_compute_capability"], target, path)
    raw_dtype = (env.get("OPTION_DTYPE") or "auto").lower()
    if raw_dtype not in rules.dtypes:
        raise PlanError(f"OPTION_DTYPE='{raw_dtype}' at '{path}' is not one of {', '.join(rules.dtypes)}")
    if raw_dtype == "bf16" and not _cc(target.compute_capability) >= (8, 0):
        raise PlanError(
            f"OPTION_DTYPE=bf16 at '{path}': {target.name}'s {target.accelerator} has no bfloat16; use fp16"
        )
    defaults = rules.runtime_defaults
    return CudaCompileParams(
        quantize=quantize,
        kv_cache_quant=kv,
        tensor_parallel_degree=degree,
        max_batch_size=_positive(env, "OPTION_MAX_ROLLING_BATCH_SIZE", int(defaults["max_rolling_batch_size"]), path),
        max_input_len=_positive(env, "OPTION_MAX_INPUT_LEN", int(defaults["max_input_len"]), path),
        max_output_len=_positive(env, "OPTION_MAX_OUTPUT_LEN", int(defaults["max_output_len"]), path),
        max_num_tokens=_positive(env, "OPTION_MAX_NUM_TOKENS", int(defaults["max_num_tokens"]), path),
        dtype=rules.dtypes[raw_dtype],
        calib_dataset=env.get("OPTION_CALIB_DATASET"),
        calib_size=_positive(env, "OPTION_CALIB_SIZE", 64, path),
    )


GiB = 2**30
_LINEAR_BYTES = {"fp8": 1.0, "smoothquant": 1.0, "awq": 0.5 + 4 / 128, "nvfp4": 0.5 + 1 / 16}
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def parameter_counts(config: Mapping[str, Any]) -> tuple[int, int]:
    """``(linear, other)`` parameters of a Llama-style decoder from its config.json (MoE experts counted):
    the linears are what a scheme quantizes, the rest (embedding, LM head, norms) stays in the dtype."""
    config = config.get("text_config") or config
    hidden, layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    experts = int(config.get("num_local_experts") or config.get("num_experts") or 1)
    intermediate = (
        int(config.get("moe_intermediate_size") or config["intermediate_size"])
        if experts > 1
        else int(config["intermediate_size"])
    )
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    mlp = 3 * hidden * intermediate * experts
    vocab = int(config["vocab_size"])
    other = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2) + hidden * (2 * layers + 1)
    return layers * (attention + mlp), other


def gpu_fit_problem(params: CudaCompileParams, config: Mapping[str, Any], target: InstanceSpec) -> str | None:
    """Whether the compiled weights at the TP degree, plus the KV cache of one sequence of max_seq_len,
    fit one of the target's GPUs (estimated from config.json; 10 % kept for the runtime itself)."""
    try:
        linear, other = parameter_counts(config)
    except (KeyError, TypeError, ValueError):
        return None  # not a Llama-style config: no estimate, the serving stack will tell
    dtype = params.dtype or str(config.get("dtype") or config.get("torch_dtype") or "bfloat16")
    plain = _DTYPE_BYTES.get(dtype, 2)
    weights = linear * _LINEAR_BYTES.get(params.quantize, plain) + other * plain
    text = config.get("text_config") or config
    heads = int(text["num_attention_heads"])
    head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // heads)
    kv_heads = int(text.get("num_key_value_heads") or heads)
    kv_bytes = 1 if params.kv_cache_quant == "fp8" else plain
    kv = (
        2
        * int(text["num_hidden_layers"])
        * kv_heads
        * head_dim
        * kv_bytes
        * (params.max_input_len + params.max_output_len)
    )
    degree = params.tensor_parallel_degree
    per_gpu = (weights + kv) / degree
    usable = target.memory_gib * GiB * 0.9
    if per_gpu <= usable:
        return None
    return (
        f"the {params.quantize} checkpoint needs about {weights / degree / GiB:.1f} GiB of weights per GPU at "
        f"OPTION_TENSOR_PARALLEL_DEGREE={degree}, plus {kv / degree / GiB:.1f} GiB of KV cache for one "
        f"{params.max_input_len + params.max_output_len}-token sequence, and each {target.accelerator} of "
        f"{target.name} has {target.memory_gib:g} GiB ({usable / GiB:.1f} GiB usable); raise the degree (up to "
        f"{target.accelerator_count}), quantize further, or choose a larger instance"
    )


def model_problems(params: CudaCompileParams, config: Mapping[str, Any], target: InstanceSpec) -> list[str]:
    """What in the model's config.json the plan cannot honour: INT4 AWQ groups across TP ranks, and
    weights plus a minimal KV cache that do not fit the target's GPUs."""
    fit = gpu_fit_problem(params, config, target)
    problems = [fit] if fit else []
    scheme = cuda_rules().schemes[params.quantize]
    degree = params.tensor_parallel_degree
    if scheme.group_size is None or degree == 1:
        return problems
    heads = int(config.get("num_attention_heads", 0))
    head_dim = int(config.get("head_dim") or (int(config.get("hidden_size", 0)) // max(heads, 1)))
    row_parallel = {"self_attn.o_proj": heads * head_dim, "mlp.down_proj": int(config.get("intermediate_size", 0))}
    for layer, width in row_parallel.items():
        if width % degree or (width // degree) % scheme.group_size:
            problems.append(
                f"OPTION_QUANTIZE={params.quantize} with OPTION_TENSOR_PARALLEL_DEGREE={degree}: {layer}'s input "
                f"dimension {width} / {degree} = {width / degree:g} is not a multiple of the group size "
                f"{scheme.group_size}, so the groups would straddle ranks; use a degree that keeps it a multiple"
            )
    return problems


def llm_api_options(params: CudaCompileParams) -> dict[str, Any]:
    """What ``trtllm-serve <dir> --extra_llm_api_options llm_api_options.yaml`` reads."""
    return {
        "tensor_parallel_size": params.tensor_parallel_degree,
        "max_batch_size": params.max_batch_size,
        "max_num_tokens": params.max_num_tokens,
        "max_seq_len": params.max_input_len + params.max_output_len,
        "kv_cache_config": {
            "dtype": params.kv_cache_quant or "auto",
            "free_gpu_memory_fraction": cuda_rules().runtime_defaults["kv_cache_free_gpu_memory_fraction"],
        },
    }


def lmi_properties(params: CudaCompileParams, torch_dtype: str) -> dict[str, str]:
    """The same limits for LMI's TensorRT-LLM container (serving.properties)."""
    short = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
    return {
        "option.tensor_parallel_degree": str(params.tensor_parallel_degree),
        "option.max_rolling_batch_size": str(params.max_batch_size),
        "option.max_input_len": str(params.max_input_len),
        "option.max_output_len": str(params.max_output_len),
        "option.max_num_tokens": str(params.max_num_tokens),
        "option.dtype": short.get(torch_dtype, torch_dtype),
    }


def plan_lines(params: CudaCompileParams) -> list[str]:
    """What ``optjob validate --model-config`` prints for a CUDA compile stage."""
    rules = cuda_rules()
    scheme = rules.schemes[params.quantize]
    algo = f" (quant_algo {scheme.quant_algo})" if scheme.quant_algo else ""
    lines = [
        f"Model Optimizer {rules.modelopt}: {scheme.description}{algo} -> unified Hugging Face checkpoint, read by "
        + " and ".join(scheme.consumers),
        f"  llm_api_options.yaml: {json.dumps(llm_api_options(params), sort_keys=True)}",
        "  serve: trtllm-serve MODEL_DIR --extra_llm_api_options MODEL_DIR/llm_api_options.yaml",
    ]
    if "vllm" in scheme.consumers:
        lines.append(f"  serve: vllm serve MODEL_DIR --tensor-parallel-size {params.tensor_parallel_degree}")
    return lines
