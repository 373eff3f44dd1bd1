"""Every path that can fail a job ends with a FailureReason a person can act on.

The form (``reason_problems``): one line, at most 1,024 characters, no traceback, not cut
mid-word, ends a sentence, and says what to do. Lifecycle reasons (timeouts, capacity, dead
workers) are checked where the real executor produces them (test_jobs_lifecycle); here are the
reason builders themselves and the failures raised inside a job's pipeline, each produced for real.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from optjob.errors import InfrastructureError, InputError, JobFailed, VerificationFailed
from optjob.jobs.outcomes import (
    capacity_reason,
    clip_reason,
    died_reason,
    internal_error_reason,
    interrupted_reason,
    reason_problems,
    timeout_reason,
)
from optjob.pipeline.stage import StageContext, technique_for
from optjob.targets.catalog import instance
from optjob.testing import build_tiny_llama
from tests.support.stages import bnb_saving_scrambled, run_quantization_stage


def _formed(reason: str) -> str:
    assert reason_problems(reason) == [], (reason, reason_problems(reason))
    return reason


def _traceback_text() -> str:
    try:
        json.loads("{not json")
    except ValueError:
        import traceback

        return traceback.format_exc()
    raise AssertionError("unreachable")


@pytest.mark.parametrize(
    "reason",
    [
        timeout_reason(60),
        timeout_reason(None),
        capacity_reason(1800, 2),
        died_reason(None, 1234),
        died_reason(-signal.SIGKILL, 1234),
        died_reason(-signal.SIGSEGV, 1234, last_output="Segmentation fault " + "x" * 2000),
        died_reason(3, 1234, last_output="fatal: simulated"),
        interrupted_reason(),
    ],
)
def test_lifecycle_reason_builders_are_formed(reason: str) -> None:
    _formed(clip_reason(reason, job="j"))


def test_internal_error_reason_names_the_bug_and_the_log_never_the_traceback() -> None:
    try:
        raise RuntimeError("boom: " + "detail " * 500 + "\n" + _traceback_text())
    except RuntimeError as exc:
        reason = internal_error_reason(exc, job="my-job")
    _formed(clip_reason(reason, job="my-job"))
    assert reason.startswith("internal error: RuntimeError: boom:") and "optjob logs my-job" in reason


def test_clip_reason_drops_a_traceback_and_cuts_at_a_word_naming_the_log() -> None:
    long = "The source could not be read because " + "the storage answered slowly " * 60 + ". Retry the job"
    clipped = clip_reason(long + "\n" + _traceback_text(), job="j")
    _formed(clipped)
    assert clipped.endswith("(optjob logs j). Retry the job.") and " ..." in clipped and "Traceback" not in clipped
    assert clip_reason("config.json is missing: upload it") == "config.json is missing: upload it."


@pytest.fixture(scope="module")
def weights_only(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("wo") / "m", train_steps=0, tokenizer=False)


def _run(model: Path, env: dict[str, str], tmp_path: Path) -> JobFailed:
    with pytest.raises(JobFailed) as info:
        run_quantization_stage(model, env, tmp_path)
    return info.value


def test_calibration_without_a_tokenizer_refuses_with_the_fix(weights_only: Path, tmp_path: Path) -> None:
    exc = _run(weights_only, {"OPTION_QUANTIZE": "gptq"}, tmp_path)
    assert isinstance(exc, InputError)
    reason = _formed(clip_reason(str(exc)))
    assert "OPTION_QUANTIZE=gptq" in reason and "no tokenizer files" in reason and "FP8_DYNAMIC" in reason


def test_text_calibration_dataset_without_a_tokenizer_refuses(weights_only: Path, tmp_path: Path) -> None:
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"text": "a calibration sample that is long enough"}) + "\n")
    exc = _run(weights_only, {"OPTION_QUANTIZE": "fp8", "OPTION_CALIB_DATASET": str(data)}, tmp_path)
    assert f"OPTION_CALIB_DATASET={data} is text" in _formed(clip_reason(str(exc)))


def test_failed_gate_reason_is_formed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from optjob.techniques.quantize import engines

    original = engines.bnb_quantize
    monkeypatch.setattr(engines, "bnb_quantize", bnb_saving_scrambled(original))
    model = build_tiny_llama(tmp_path / "m")
    exc = _run(model, {"OPTION_QUANTIZE": "nf4", "OPTION_BNB_DOUBLE_QUANT": "false"}, tmp_path)
    assert isinstance(exc, VerificationFailed)
    reason = _formed(clip_reason(str(exc)))
    assert "Nothing was published" in reason and "higher-precision scheme" in reason


def test_unreadable_checkpoint_in_the_end_to_end_check_points_to_the_log(tmp_path: Path) -> None:
    from optjob.runtime.events import EventSink
    from optjob.verify.gate import run_gate
    from optjob.verify.tensors import TensorFigures

    model = build_tiny_llama(tmp_path / "m", train_steps=0)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((model / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    events = []
    figures = TensorFigures(quantized_tensors=1)
    with pytest.raises(InfrastructureError) as info:
        run_gate(model, broken, "fp8_dynamic", events=EventSink(events.append), per_tensor_figures=figures)
    reason = _formed(clip_reason(str(info.value)))
    assert "end-to-end verification could not read the checkpoints" in reason and "job log" in reason
    logged = [e for e in events if e.step == "e2e_error"]
    assert logged and "Traceback" in logged[0].fields["traceback"]  # the traceback goes to the log


@pytest.mark.parametrize("member", ["ModelShardingConfig", "ModelSpeculativeDecodingConfig"])
def test_pending_technique_reason_is_formed(member: str, tmp_path: Path) -> None:
    from optjob.api import shapes

    tech = technique_for(member)
    spec = instance("ml.g6.12xlarge")
    env = {"OPTION_TENSOR_PARALLEL_DEGREE": "2"} if member == "ModelShardingConfig" else {}
    wire = {"Technique": "EAGLE"} if member == "ModelSpeculativeDecodingConfig" else {}
    config = getattr(shapes, member).model_validate(wire)
    try:
        stage = tech.plan(config, env, spec, path="OptimizationConfigs[0]")
    except JobFailed as exc:  # a plan-time refusal is a FailureReason too (the container path)
        _formed(clip_reason(str(exc)))
        return
    ctx = StageContext(
        job_name="t", input_dir=tmp_path, output_dir=tmp_path / "o", work_dir=tmp_path / "w", target=spec
    )
    with pytest.raises(JobFailed) as info:
        tech.run(stage, ctx)
    _formed(clip_reason(str(info.value)))
