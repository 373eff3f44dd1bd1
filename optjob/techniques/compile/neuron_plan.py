"""The exact export optimum-neuron would run for a request and a model, computed on any host.

optimum-neuron 0.4.5 cannot share our environment (it needs transformers 4.57) and cannot compile
without the Neuron SDK, yet what it will do is decided by a handful of rules: the compilation target
of the instance type, defaults for batch size and sequence length, the model class's choice of
fused QKV, continuous batching and on-device sampling, the compiler arguments, and how attention
heads are padded and replicated across tensor-parallel ranks. Those rules are data in
``configs/neuron.yaml``; this module applies them, so a plan can be printed by ``optjob validate``
and checked before any work starts. ``tests/test_neuron_plan.py`` runs optimum-neuron's own code
(in its own environment) on the same requests and requires the same ``neuron_config.json``, the
same compiler arguments and the same head sharding, field for field.

Two deliberate differences from running ``optimum-cli`` by hand, both stated in the plan:

* optimum-neuron takes the dtype from ``config.json`` and silently ignores ``--torch_dtype``; we
  honour ``OPTION_DTYPE`` by writing it into the export's copy of ``config.json``;
* a sequence length above ``max_position_embeddings`` is accepted by optimum-neuron and warned
  about here, because the model was not trained for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any

from pydantic import BaseModel, ConfigDict

from optjob.config_files import load_config

TASK = "text-generation"


class NeuronPlanError(ValueError):
    """optimum-neuron would refuse this export; the message names the field and the fix."""


class NeuronRules(BaseModel):
    model_config = ConfigDict(frozen=True)

    optimum_neuron: str
    neuronx_cc: str
    neuron_sdk: str
    targets: dict[str, str]
    default_sequence_cap: int
    default_sequence_fallback: int
    compiler_args: dict[str, str]
    logical_cores: dict[str, int]
    architectures: dict[str, dict[str, Any]]
    fixed: dict[str, Any]
    dtypes: dict[str, str]


@cache
def neuron_rules() -> NeuronRules:
    return NeuronRules.model_validate(load_config("neuron.yaml"))


class NeuronRequest(BaseModel):
    """What the job asks of the export (LMI's OPTION_* variables, resolved)."""

    model_config = ConfigDict(frozen=True)

    instance_type: str  # inf2, trn1, trn1n, trn2: the instance family
    tensor_parallel_size: int
    batch_size: int = 1
    sequence_length: int | None = None  # None: optimum-neuron's default for the model
    dtype: str | None = None  # None: the checkpoint's own dtype


class AttentionSharding(BaseModel):
    """How NxD spreads the attention heads over the ranks (padded to a multiple of the degree)."""

    strategy: str  # replicate-to-tp-degree or convert-to-mha
    num_attention_heads: int
    num_key_value_heads: int
    heads_per_rank: int
    kv_heads_per_rank: int


class NeuronExportPlan(BaseModel):
    """``neuron_config.json`` as optimum-neuron writes it, the neuronx-cc arguments and the command."""

    model_type: str
    target: str
    neuron_config: dict[str, Any]
    compiler_args: str
    attention_sharding: AttentionSharding
    export_dtype: str
    cli_args: list[str]
    warnings: list[str] = []


def _dtype(config: Mapping[str, Any], request: NeuronRequest, rules: NeuronRules) -> str:
    wanted = request.dtype or config.get("dtype") or config.get("torch_dtype")
    if wanted is None:
        raise NeuronPlanError(
            "config.json names no dtype (neither 'dtype' nor 'torch_dtype'), and optimum-neuron takes the compile "
            "dtype from there; set OPTION_DTYPE to bf16, fp16 or fp32"
        )
    if wanted not in rules.dtypes:
        raise NeuronPlanError(f"dtype '{wanted}' cannot be compiled for Neuron; set OPTION_DTYPE to bf16, fp16 or fp32")
    return rules.dtypes[wanted]


def _sequence_length(config: Mapping[str, Any], request: NeuronRequest, rules: NeuronRules) -> int:
    if request.sequence_length is not None:
        return request.sequence_length
    native = config.get("n_positions", config.get("max_position_embeddings", rules.default_sequence_fallback))
    return min(int(native), rules.default_sequence_cap)


def attention_sharding(degree: int, heads: int, kv_heads: int | None) -> AttentionSharding:
    """NxD's GQA rule: KV heads are replicated when the degree is a multiple of them, else the model
    is converted to multi-head attention; both head counts are padded to a multiple of the degree."""
    kv = kv_heads or heads
    strategy = "replicate-to-tp-degree" if degree % kv == 0 else "convert-to-mha"
    padded = heads + (-heads % degree)
    if kv == heads:
        padded_kv = padded
    elif kv < degree or kv % degree:
        padded_kv = degree if strategy == "replicate-to-tp-degree" else padded
    else:
        padded_kv = kv
    return AttentionSharding(
        strategy=strategy,
        num_attention_heads=padded,
        num_key_value_heads=padded_kv,
        heads_per_rank=padded // degree,
        kv_heads_per_rank=padded_kv // degree,
    )


def plan_export(
    config: Mapping[str, Any], request: NeuronRequest, rules: NeuronRules | None = None
) -> NeuronExportPlan:
    """The export for ``config`` (the model's ``config.json``); raises NeuronPlanError as optimum-neuron would."""
    rules = rules or neuron_rules()
    config = config.get("text_config") or config  # multimodal configs: optimum-neuron exports the text model
    if request.instance_type not in rules.targets:
        raise NeuronPlanError(
            f"instance family '{request.instance_type}' is not a Neuron compilation target; optimum-neuron "
            f"{rules.optimum_neuron} compiles for {', '.join(rules.targets)}"
        )
    model_type = str(config.get("model_type", ""))
    arch = rules.architectures.get(model_type)
    if arch is None:
        raise NeuronPlanError(
            f"model_type '{model_type}' is not supported for {TASK} by optimum-neuron {rules.optimum_neuron}; "
            f"supported: {', '.join(sorted(rules.architectures))}"
        )
    if request.tensor_parallel_size < 1 or request.batch_size < 1:
        raise NeuronPlanError("the tensor-parallel degree and the batch size must be at least 1")
    target = rules.targets[request.instance_type]
    degree, batch = request.tensor_parallel_size, request.batch_size
    sequence = _sequence_length(config, request, rules)
    dtype = _dtype(config, request, rules)
    continuous = arch["continuous_batching"] == "batch" and batch > 1
    on_device = bool(arch["on_device_sampling"]) and not (
        continuous and degree == arch.get("on_device_sampling_off_with_cb_tp")
    )
    warnings = []
    if not on_device and arch["on_device_sampling"]:
        warnings.append(
            f"optimum-neuron turns on-device sampling off for {model_type} with continuous batching at "
            f"tensor-parallel degree {degree}; sampling runs on the host"
        )
    native = config.get("max_position_embeddings")
    if native is not None and sequence > int(native):
        warnings.append(
            f"OPTION_N_POSITIONS={sequence} exceeds the model's max_position_embeddings ({native}); optimum-neuron "
            "compiles it, but the model was not trained for sequences that long"
        )
    neuron_config = {
        "_serialized_key": "NxDNeuronConfig",
        **rules.fixed,
        "batch_size": batch,
        "checkpoint_id": None,  # exported from the job's local copy, as optimum-neuron records a local path
        "checkpoint_revision": None,
        "continuous_batching": continuous,
        "fused_qkv": bool(arch["fused_qkv"]),
        "local_ranks_size": degree,
        "max_batch_size": batch,
        "max_context_length": sequence,
        "n_active_tokens": sequence,
        "neuronxcc_version": rules.neuronx_cc,
        "on_device_sampling": on_device,
        "optimum_neuron_version": rules.optimum_neuron,
        "sequence_length": sequence,
        "target": target,
        "torch_dtype": dtype,
        "tp_degree": degree,
    }
    template = rules.compiler_args[arch["compiler"]]
    heads = int(config.get("num_attention_heads", 0))
    if heads < 1:
        raise NeuronPlanError(
            "config.json has no num_attention_heads; it is not a decoder model optimum-neuron exports"
        )
    return NeuronExportPlan(
        model_type=model_type,
        target=target,
        neuron_config=dict(sorted(neuron_config.items())),
        compiler_args=template.format(lnc=rules.logical_cores[target], target=target),
        attention_sharding=attention_sharding(degree, heads, config.get("num_key_value_heads")),
        export_dtype=dtype,
        cli_args=[
            "optimum-cli",
            "export",
            "neuron",
            "--model",
            "MODEL_DIR",
            "--task",
            TASK,
            "--batch_size",
            str(batch),
            "--sequence_length",
            str(sequence),
            "--tensor_parallel_size",
            str(degree),
            "--instance_type",
            request.instance_type,
            "OUTPUT_DIR",
        ],  # fmt: skip
        warnings=warnings,
    )
