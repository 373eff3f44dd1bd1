"""The shipped example specs validate, and the broken ones fail with exactly the expected messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from optjob.api.errors import ValidationException
from optjob.cli.validate import load_request
from optjob.pipeline.plan import build_plan
from tests.support.botocore_model import shape

EXAMPLES = Path(__file__).resolve().parent.parent / "configs" / "examples"
ENUM = "[" + ", ".join(shape("OptimizationJobDeploymentInstanceType")["enum"]) + "]"
UNION = (
    "Member must have exactly one of the following members set: ModelQuantizationConfig, "
    "ModelCompilationConfig, ModelShardingConfig, ModelSpeculativeDecodingConfig"
)

VALID = {
    "fp8-g6-12xlarge.json": ("ml.g6.12xlarge", "L4", ["Quantization"]),
    "awq-g5-2xlarge.json": ("ml.g5.2xlarge", "A10G", ["Quantization"]),
    "awq-g5-2xlarge.yaml": ("ml.g5.2xlarge", "A10G", ["Quantization"]),
    "neuron-compile-inf2-48xlarge.json": ("ml.inf2.48xlarge", "Inferentia2", ["Compilation"]),
    "eagle-p5-48xlarge.json": ("ml.p5.48xlarge", "H100", ["SpeculativeDecoding"]),
    "eagle-g6-12xlarge.json": ("ml.g6.12xlarge", "L4", ["SpeculativeDecoding"]),
    "shard-tp2-g6-12xlarge.json": ("ml.g6.12xlarge", "L4", ["Sharding"]),
    "compile-fp8-g6-12xlarge.json": ("ml.g6.12xlarge", "L4", ["Compilation"]),
}

BROKEN = {
    "empty-union-element.json": "1 validation error detected: Value '{}' at 'optimizationConfigs.1.member' "
    f"failed to satisfy constraint: {UNION} (found none)",
    "two-union-members.json": "1 validation error detected: Value '{ModelQuantizationConfig={}, "
    "ModelShardingConfig={}}' at 'optimizationConfigs.1.member' failed to satisfy constraint: "
    f"{UNION} (found ModelQuantizationConfig, ModelShardingConfig)",
    "missing-role.json": "1 validation error detected: Value null at 'roleArn' failed to satisfy constraint: "
    "Member must not be null",
    "bad-instance-type.json": "1 validation error detected: Value 'ml.g6.13xlarge' at 'deploymentInstanceType' "
    f"failed to satisfy constraint: Member must satisfy enum value set: {ENUM}",
    "bad-job-name.json": "1 validation error detected: Value 'llama_fp8' at 'optimizationJobName' failed to "
    "satisfy constraint: Member must satisfy regular expression pattern: [a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}",
    "pending-too-short.json": "1 validation error detected: Value '60' at 'stoppingCondition.maxPendingTimeInSeconds' "
    "failed to satisfy constraint: Member must have value greater than or equal to 1800",
    "unknown-member.json": "1 validation error detected: Value 'x' at 'optimizationJobname' failed to satisfy "
    "constraint: Member is not a recognized member of this structure (names are case-sensitive)",
    "bad-speculative-technique.json": "1 validation error detected: Value 'MEDUSA' at "
    "'optimizationConfigs.1.member.modelSpeculativeDecodingConfig.technique' failed to satisfy constraint: "
    "Member must satisfy enum value set: [EAGLE]",
    "several-errors.json": "3 validation errors detected: Value null at 'roleArn' failed to satisfy constraint: "
    "Member must not be null; Value 'ml.g6.13xlarge' at 'deploymentInstanceType' failed to satisfy constraint: "
    f"Member must satisfy enum value set: {ENUM}; Value '{{}}' at 'optimizationConfigs.1.member' failed to "
    f"satisfy constraint: {UNION} (found none)",
    "quantize-on-neuron.json": "1 problem with the optimization request: ModelQuantizationConfig at "
    "'optimizationConfigs.1.member.modelQuantizationConfig' is not available for ml.inf2.48xlarge (neuron): "
    "quantization schemes produce GPU checkpoints; on Inferentia/Trainium use ModelCompilationConfig, which "
    "compiles for NeuronCores",
    "neuron-compile-without-tp.json": "1 problem with the optimization request: OPTION_TENSOR_PARALLEL_DEGREE "
    "is required at 'optimizationConfigs.1.member.modelCompilationConfig' (set it in OptimizationEnvironment or "
    "OverrideEnvironment); ml.inf2.48xlarge has 24 NeuronCores, so use a divisor of 24",
    "sharding-combined.json": "1 problem with the optimization request: ModelShardingConfig cannot be combined "
    "with ModelQuantizationConfig: run the other techniques in one job, then shard its output in a second job",
}


@pytest.mark.parametrize("name", sorted(VALID))
def test_example_specs_validate_and_plan(name: str) -> None:
    instance_type, accelerator, types = VALID[name]
    plan = build_plan(load_request(str(EXAMPLES / name)), region="us-west-2")
    assert plan.target.name == instance_type
    assert plan.target.accelerator == accelerator
    assert plan.optimization_types == types
    assert plan.recommended_image
    if "Sharding" not in types:  # sharded_state is served by the vLLM release image, the same everywhere
        assert "us-west-2" in plan.recommended_image
    explicit = [stage.image for stage in plan.stages if stage.image]
    if explicit:  # an explicit Image in the last config wins over configs/images.yaml
        assert plan.recommended_image == explicit[-1]


def test_every_broken_example_has_an_expectation() -> None:
    assert {p.name for p in (EXAMPLES / "broken").glob("*.json")} == set(BROKEN)


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_examples_fail_with_exact_messages(name: str) -> None:
    with pytest.raises(ValidationException) as caught:
        build_plan(load_request(str(EXAMPLES / "broken" / name)), region="us-east-1")
    assert caught.value.code == "ValidationException"
    assert caught.value.message == BROKEN[name]
