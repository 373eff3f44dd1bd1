"""plan(): OPTION_* parsing, capability rules as data, TP check, serving properties (no model needed)."""

from __future__ import annotations

import pytest

from optjob.api.shapes import ModelQuantizationConfig
from optjob.pipeline.stage import PlanError, technique_for
from optjob.targets.catalog import instance
from optjob.techniques.quantize.params import layer_env, option_to_property, parse_params

PATH = "optimizationConfigs.0.modelQuantizationConfig"


def plan(env, target="ml.g6e.xlarge", image=None):
    tech = technique_for("ModelQuantizationConfig")
    return tech.plan(ModelQuantizationConfig(image=image), env, instance(target), path=PATH)


def test_layering_precedence():
    env = layer_env(
        {"OPTION_QUANTIZE": "awq", "A": "1"},
        {"OPTION_QUANTIZE": "fp8", "B": "2"},
        {"OPTION_FP8_SCHEME": "FP8_DYNAMIC", "B": "3"},
    )
    assert env == {"OPTION_QUANTIZE": "fp8", "A": "1", "B": "3", "OPTION_FP8_SCHEME": "FP8_DYNAMIC"}
    assert option_to_property("OPTION_MAX_MODEL_LEN") == "option.max_model_len"
    assert option_to_property("OPTION_ENTRYPOINT") == "option.entryPoint"


def test_defaults_follow_sagemaker():
    p = parse_params({})
    assert (p.quantize, p.awq_block_size, p.awq_weight_bit_width, p.awq_zero_point) == ("awq", 128, 4, True)
    assert (p.fp8_scheme, p.fp8_ignore, p.calib_size, p.max_model_len) == ("FP8", ("lm_head",), 512, 2048)
    assert p.smoothquant_alpha == 0.8 and p.kv_cache_dtype == "auto"


def test_values_are_typed_and_case_insensitive():
    p = parse_params(
        {
            "OPTION_QUANTIZE": "FP8",
            "OPTION_FP8_SCHEME": "fp8_block",
            "OPTION_AWQ_ZERO_POINT": "False",
            "OPTION_AWQ_IGNORE_LAYERS": "mlp.down_proj, o_proj",
            "OPTION_CALIB_SIZE": "64",
        }
    )
    assert p.fp8_scheme == "FP8_BLOCK" and p.awq_zero_point is False and p.calib_size == 64
    assert p.awq_ignore_layers == ("mlp.down_proj", "o_proj")
    assert p.ignore == ["lm_head"]  # fp8 uses OPTION_FP8_IGNORE, not the AWQ list
    assert set(p.explicit) >= {"OPTION_QUANTIZE", "OPTION_FP8_SCHEME"}


@pytest.mark.parametrize(
    ("key", "value", "expect"),
    [
        ("OPTION_QUANTIZE", "int3", "awq, fp8, smoothquant, gptq, nf4, int8, nvfp4, mxfp4"),
        ("OPTION_FP8_SCHEME", "FP8_STATIC", "FP8, FP8_DYNAMIC, FP8_BLOCK"),
        ("OPTION_AWQ_BLOCK_SIZE", "100", "32, 64, 128"),
        ("OPTION_AWQ_ZERO_POINT", "maybe", "bool"),
        ("OPTION_SMOOTHQUANT_ALPHA", "1.5", "out of range"),
        ("OPTION_KV_CACHE_DTYPE", "int4", "auto, fp8, fp8_e4m3"),
    ],
)
def test_bad_values_name_variable_value_allowed_and_path(key, value, expect):
    env = {"OPTION_QUANTIZE": "fp8", key: value} if key != "OPTION_QUANTIZE" else {key: value}
    with pytest.raises(PlanError) as info:
        plan(env)
    text = str(info.value)
    assert key in text and repr(value) in text and expect in text and PATH in text


def test_awq_default_plan():
    stage = plan({})
    assert stage.technique == "ModelQuantizationConfig" and stage.optimization_type == "Quantization"
    assert stage.engine == "llmcompressor" and stage.needs.calibration_data
    assert stage.image_framework == "lmi" and stage.image is None
    assert stage.serving_properties["option.quantize"] == "compressed-tensors"
    assert "option.model_id" not in stage.serving_properties
    assert stage.warnings == ()


def test_fp8_streaming_engines_and_explicit_image():
    stage = plan(
        {
            "OPTION_QUANTIZE": "fp8",
            "OPTION_FP8_SCHEME": "FP8_DYNAMIC",
            "OPTION_MAX_MODEL_LEN": "4096",
            "OPTION_MODEL_ID": "s3://x",
        },
        image="my/image:1",
    )
    assert stage.engine == "streaming" and not stage.needs.whole_model_in_memory
    assert not stage.needs.calibration_data and stage.image == "my/image:1"
    assert stage.serving_properties["option.max_model_len"] == "4096"
    assert "option.model_id" not in stage.serving_properties
    assert "option.fp8_scheme" not in stage.serving_properties  # job-time knob
    static = plan({"OPTION_QUANTIZE": "fp8"})
    assert static.engine == "llmcompressor" and static.needs.calibration_data


@pytest.mark.parametrize("target", ["ml.g5.2xlarge", "ml.p4d.24xlarge", "ml.p4de.24xlarge"])
def test_fp8_on_ampere_is_weight_only_with_warning(target):
    stage = plan({"OPTION_QUANTIZE": "fp8"}, target=target)
    assert any("W8A16" in w for w in stage.warnings)


def test_fp8_native_on_ada_and_hopper():
    for target in ("ml.g6.xlarge", "ml.p5.48xlarge"):
        assert plan({"OPTION_QUANTIZE": "fp8"}, target=target).warnings == ()


def test_t4_has_no_bf16():
    stage = plan({"OPTION_QUANTIZE": "awq"}, target="ml.g4dn.xlarge")
    assert stage.params["dtype"] == "fp16" and stage.serving_properties["option.dtype"] == "fp16"
    assert any("bf16" in w for w in stage.warnings)
    with pytest.raises(PlanError, match="bf16"):
        plan({"OPTION_QUANTIZE": "awq", "OPTION_DTYPE": "bf16"}, target="ml.g4dn.xlarge")
    with pytest.raises(PlanError, match="compute capability >= 8.0"):
        plan({"OPTION_QUANTIZE": "fp8"}, target="ml.g4dn.xlarge")


@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4"])
def test_fp4_only_on_blackwell(scheme):
    with pytest.raises(PlanError, match=r"compute capability >= 10.0.*sm_90"):
        plan({"OPTION_QUANTIZE": scheme}, target="ml.p5.48xlarge")
    assert plan({"OPTION_QUANTIZE": scheme}, target="ml.p6-b200.48xlarge").engine == "llmcompressor"
    assert plan({"OPTION_QUANTIZE": scheme}, target="ml.g7e.2xlarge").warnings == ()


@pytest.mark.parametrize("target", ["ml.inf2.xlarge", "ml.trn1.32xlarge"])
def test_gpu_schemes_rejected_on_neuron(target):
    for scheme in ("awq", "fp8", "nf4"):
        with pytest.raises(PlanError, match="Neuron"):
            plan({"OPTION_QUANTIZE": scheme}, target=target)


def test_tensor_parallel_degree_must_divide_accelerators():
    assert (
        plan({"OPTION_TENSOR_PARALLEL_DEGREE": "4"}, target="ml.g5.48xlarge").params["options"][
            "tensor_parallel_degree"
        ]
        == 4
    )
    with pytest.raises(PlanError, match=r"OPTION_TENSOR_PARALLEL_DEGREE=3 .*8 x A10G"):
        plan({"OPTION_TENSOR_PARALLEL_DEGREE": "3"}, target="ml.g5.48xlarge")
    with pytest.raises(PlanError, match="must divide"):
        plan({"OPTION_TENSOR_PARALLEL_DEGREE": "2"}, target="ml.g5.xlarge")


def test_fp8_kv_cache_option():
    stage = plan({"OPTION_QUANTIZE": "fp8", "OPTION_KV_CACHE_DTYPE": "fp8"}, target="ml.g5.2xlarge")
    assert stage.serving_properties["option.kv_cache_dtype"] == "fp8"
    assert any("KV cache" in w for w in stage.warnings)


def test_bitsandbytes_serving_properties():
    stage = plan({"OPTION_QUANTIZE": "nf4"})
    assert stage.engine == "bitsandbytes" and "option.quantize" not in stage.serving_properties


def test_plan_is_json_serializable():
    stage = plan({"OPTION_QUANTIZE": "gptq"})
    assert type(stage).model_validate_json(stage.model_dump_json()) == stage
