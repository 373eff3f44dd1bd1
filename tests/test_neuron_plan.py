"""Neuron export plans: optjob's rules against optimum-neuron 0.4.5's own code, field for field.

optimum-neuron runs in its own environment (scripts/neuron_env.sh: transformers 4.57, no Neuron SDK)
through scripts/neuron_plan_crosscheck.py, which drives ``optimum-cli export neuron``'s real code path
up to the compiler call. For each request below, optjob's plan (``configs/neuron.yaml`` applied by
``optjob.techniques.compile.neuron_plan``) must give the same ``neuron_config.json``, the same neuronx-cc
arguments and the same attention-head sharding, and must refuse exactly what optimum-neuron refuses.

Set OPTJOB_SKIP_NEURON_CROSSCHECK=1 to skip the cross-check on a machine that cannot build the side
environment (about 1.5 minutes and 1.2 GB the first time); CI never sets it.
"""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

import optjob.cli.validate  # noqa: F401  (registers the command on the app)
from optjob.cli import app
from optjob.techniques.compile.neuron_plan import NeuronPlanError, NeuronRequest, attention_sharding, plan_export

ROOT = Path(__file__).resolve().parent.parent

LLAMA: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 300,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-05,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}
QWEN2 = {
    **LLAMA,
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
}
QWEN3 = {**LLAMA, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 32}
MIXTRAL = {
    **LLAMA,
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 4096,
}
MHA8 = {**LLAMA, "num_attention_heads": 8, "num_key_value_heads": 8}
MISTRAL = {**LLAMA, "architectures": ["MistralForCausalLM"], "model_type": "mistral"}
NO_DTYPE = {k: v for k, v in LLAMA.items() if k != "torch_dtype"}

# (id, config, instance family, batch, sequence length or None for the default, degree)
CASES = [
    ("llama-inf2-defaults", LLAMA, "inf2", 1, None, 2),
    ("llama-trn1-cb-tp8", LLAMA, "trn1", 4, 1024, 8),
    ("llama-trn1n", LLAMA, "trn1n", 2, 512, 4),
    ("llama-trn2", LLAMA, "trn2", 1, 1024, 4),
    ("llama-tp3-convert-to-mha", LLAMA, "inf2", 1, 1024, 3),
    ("qwen2-cb-tp2-no-device-sampling", QWEN2, "inf2", 4, 1024, 2),
    ("qwen3-cb-tp2", QWEN3, "trn1", 2, 2048, 2),
    ("mixtral", MIXTRAL, "trn1", 1, 1024, 2),
    ("mha8-tp3", MHA8, "inf2", 1, 1024, 3),
    ("mistral-refused", MISTRAL, "inf2", 1, 1024, 2),
    ("no-dtype-refused", NO_DTYPE, "inf2", 1, 1024, 2),
]


def _ours(config: dict, family: str, batch: int, sequence: int | None, degree: int) -> dict:
    request = NeuronRequest(
        instance_type=family, tensor_parallel_size=degree, batch_size=batch, sequence_length=sequence
    )
    try:
        return plan_export(config, request).model_dump()
    except NeuronPlanError as exc:
        return {"error": str(exc)}


def test_rules_for_a_llama_on_inf2() -> None:
    plan = plan_export(LLAMA, NeuronRequest(instance_type="inf2", tensor_parallel_size=2, batch_size=4))
    config = plan.neuron_config
    assert (config["target"], config["sequence_length"], config["continuous_batching"]) == ("trn1", 2048, True)
    assert config["torch_dtype"] == "bfloat16" and config["neuronxcc_version"].startswith("2.21.33363.0")
    assert plan.compiler_args.endswith("-O2  --lnc=1 --target trn1")
    assert "--instance_type" in plan.cli_args and plan.cli_args[plan.cli_args.index("--instance_type") + 1] == "inf2"
    # OPTION_DTYPE is honoured (optimum-neuron would ignore --torch_dtype): the export copy's config says so
    assert plan_export(
        LLAMA, NeuronRequest(instance_type="inf2", tensor_parallel_size=2, dtype="fp16")
    ).export_dtype == ("float16")
    long = plan_export(LLAMA, NeuronRequest(instance_type="inf2", tensor_parallel_size=2, sequence_length=4096))
    assert any("max_position_embeddings (2048)" in w for w in long.warnings)


def test_attention_heads_are_padded_and_replicated_as_nxd_does() -> None:
    assert attention_sharding(8, 32, 8).model_dump() == {
        "strategy": "replicate-to-tp-degree", "num_attention_heads": 32, "num_key_value_heads": 8,
        "heads_per_rank": 4, "kv_heads_per_rank": 1,
    }  # fmt: skip
    assert attention_sharding(32, 32, 8).num_key_value_heads == 32  # KV heads replicated to the degree
    wide = attention_sharding(24, 32, 8)  # heads padded to 48, the 8 KV heads replicated to 24
    assert (wide.strategy, wide.num_attention_heads, wide.num_key_value_heads) == ("replicate-to-tp-degree", 48, 24)
    odd = attention_sharding(3, 32, 8)  # 3 is no multiple of 8: multi-head attention, both padded to 33
    assert (odd.strategy, odd.num_attention_heads, odd.num_key_value_heads) == ("convert-to-mha", 33, 33)


@pytest.mark.parametrize(
    ("config", "request_", "fragment"),
    [
        (MISTRAL, {}, "model_type 'mistral' is not supported"),
        (NO_DTYPE, {}, "set OPTION_DTYPE"),
        (LLAMA, {"instance_type": "inf1"}, "not a Neuron compilation target"),
    ],
)
def test_refusals_name_the_fix(config: dict, request_: dict, fragment: str) -> None:
    with pytest.raises(NeuronPlanError, match=fragment):
        plan_export(config, NeuronRequest(**{"instance_type": "inf2", "tensor_parallel_size": 2, **request_}))


def test_validate_prints_the_plan_and_refuses_what_optimum_neuron_refuses(tmp_path: Path) -> None:
    runner = CliRunner()
    example = ROOT / "configs" / "examples" / "neuron-compile-trn1-32xlarge.json"
    model = tmp_path / "config.json"
    model.write_text(json.dumps({**LLAMA, "num_attention_heads": 32, "num_key_value_heads": 8}))
    result = runner.invoke(app, ["validate", str(example), "--model-config", str(model)])
    assert result.exit_code == 0, result.output
    assert "neuron_config.json" in result.output and "--target trn1" in result.output
    assert "replicate-to-tp-degree" in result.output
    model.write_text(json.dumps(MISTRAL))
    refused = runner.invoke(app, ["validate", str(example), "--model-config", str(model)])
    assert refused.exit_code == 1 and "model_type 'mistral' is not supported" in refused.output


def _theirs(python: str, config: dict, family: str, batch: int, sequence: int | None, degree: int) -> dict:
    request = {
        "config": config, "batch_size": batch, "sequence_length": sequence, "tensor_parallel_size": degree,
        "instance_type": family, "dtype": None, "task": "text-generation",
    }  # fmt: skip
    done = subprocess.run(
        [python, str(ROOT / "scripts" / "neuron_plan_crosscheck.py")],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_plans_equal_optimum_neurons_own(neuron_python: str) -> None:
    with ThreadPoolExecutor(max_workers=2) as pool:
        theirs = list(pool.map(lambda case: _theirs(neuron_python, *case[1:]), CASES))
    for (name, *case), their in zip(CASES, theirs, strict=True):
        ours = _ours(*case)
        if "error" in their:
            assert "error" in ours, (name, their["error"])
            continue
        assert "error" not in ours, (name, ours)
        assert their["versions"]["optimum_neuron"] == ours["neuron_config"]["optimum_neuron_version"], name
        assert ours["neuron_config"] == their["neuron_config"], name
        assert ours["compiler_args"] == their["compiler_args"], name
        assert ours["attention_sharding"] == their["attention_sharding"], name
        assert ours["target"] == their["env_NEURON_PLATFORM_TARGET_OVERRIDE"], name


def test_a_job_refuses_the_model_before_looking_for_the_sdk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from optjob.errors import InputError, ToolchainMissing
    from optjob.pipeline.stage import StageContext, technique_for
    from optjob.targets.catalog import instance

    tech = technique_for("ModelCompilationConfig")
    target = instance("ml.inf2.48xlarge")
    stage = tech.plan(_Config(), {"OPTION_TENSOR_PARALLEL_DEGREE": "8"}, target, path="OptimizationConfigs[0]")
    model = tmp_path / "model"
    model.mkdir()
    ctx = StageContext(
        job_name="j", input_dir=model, output_dir=tmp_path / "out", work_dir=tmp_path / "w", target=target
    )
    (model / "config.json").write_text(json.dumps(MISTRAL))
    with pytest.raises(InputError, match="cannot be compiled for Neuron as requested: model_type 'mistral'"):
        tech.run(stage, ctx)
    (model / "config.json").write_text(json.dumps(LLAMA))
    monkeypatch.setenv("OPTJOB_NEURON_ENV", str(tmp_path / "no-such-env"))
    # a plannable model on a host without optimum-neuron's environment
    with pytest.raises(ToolchainMissing, match="optimum-neuron 0.4.5 in its own environment, and there is none"):
        tech.run(stage, ctx)


class _Config(BaseModel):
    Image: str | None = None
