"""Every scheme end to end on the tiny Llama: plan -> run -> verified output that transformers reloads."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import BaseModel
from transformers import AutoModelForCausalLM

from optjob.package.serving import read_serving_properties
from optjob.pipeline.stage import StageContext, technique_for
from optjob.targets.catalog import instance
from optjob.testing import build_tiny_llama

FAST_CALIB = {"OPTION_CALIB_SIZE": "16", "OPTION_MAX_MODEL_LEN": "128"}
CASES = {
    "awq": ({"OPTION_QUANTIZE": "awq"}, "ml.g5.2xlarge", "pack-quantized"),
    "gptq": ({"OPTION_QUANTIZE": "gptq"}, "ml.g6.xlarge", "pack-quantized"),
    "smoothquant": ({"OPTION_QUANTIZE": "smoothquant"}, "ml.g6.xlarge", "int-quantized"),
    "fp8": ({"OPTION_QUANTIZE": "fp8"}, "ml.g6e.xlarge", "float-quantized"),
    "fp8_dynamic": (
        {"OPTION_QUANTIZE": "fp8", "OPTION_FP8_SCHEME": "FP8_DYNAMIC"},
        "ml.p5.48xlarge",
        "float-quantized",
    ),
    "fp8_block": ({"OPTION_QUANTIZE": "fp8", "OPTION_FP8_SCHEME": "FP8_BLOCK"}, "ml.g5.2xlarge", "float-quantized"),
    "nvfp4": ({"OPTION_QUANTIZE": "nvfp4"}, "ml.p6-b200.48xlarge", "nvfp4-pack-quantized"),
    "mxfp4": ({"OPTION_QUANTIZE": "mxfp4"}, "ml.g7e.2xlarge", "mxfp4-pack-quantized"),
    "nf4": ({"OPTION_QUANTIZE": "nf4"}, "ml.g6.xlarge", None),
    "int8": ({"OPTION_QUANTIZE": "int8"}, "ml.g6.xlarge", None),
}


class _Config(BaseModel):
    Image: str | None = None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "m")


def run_job(tiny, tmp_path, env, target):
    tech = technique_for("ModelQuantizationConfig")
    spec = instance(target)
    stage = tech.plan(_Config(), {**FAST_CALIB, **env}, spec, path="optimizationConfigs.0.modelQuantizationConfig")
    ctx = StageContext(
        job_name="t", input_dir=tiny, output_dir=tmp_path / "out", work_dir=tmp_path / "work", target=spec
    )
    return stage, tech.run(stage, ctx), ctx


@pytest.mark.parametrize("case", list(CASES))
def test_scheme_quantizes_verifies_and_reloads(tiny, tmp_path, case):
    env, target, fmt = CASES[case]
    stage, result, ctx = run_job(tiny, tmp_path, env, target)
    out = ctx.output_dir
    for name in ("config.json", "tokenizer.json", "generation_config.json", "serving.properties"):
        assert (out / name).is_file(), name
    assert list(out.glob("*.safetensors"))
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    props = read_serving_properties(out / "serving.properties")
    assert "option.model_id" not in props
    if fmt is None:
        assert qcfg["quant_method"] == "bitsandbytes" and "option.quantize" not in props
    else:
        assert qcfg["quant_method"] == "compressed-tensors" and qcfg["format"] == fmt
        assert props["option.quantize"] == "compressed-tensors"

    ver = result.metrics["verification"]
    assert ver["passed"] and ver["scheme"] == case
    assert ver["per_tensor"]["quantized_tensors"] == 28
    assert ver["e2e"] is not None and ver["e2e"]["top1_agreement"] >= ver["thresholds"]["e2e"]["min_top1"]
    assert result.metrics["timings"]["quantize_s"] > 0 and result.metrics["memory_fit"]["fits"]
    assert (ctx.work_dir / "quantization-report.json").is_file()
    if target == "ml.g5.2xlarge" and case.startswith("fp8"):
        assert any("W8A16" in w for w in result.warnings)

    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 50, 60, 70]])).logits).all()
