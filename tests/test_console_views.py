"""The console's derivations from what the store and the log record: the parts that can be wrong quietly."""

from __future__ import annotations

import json

from optjob.console.views import REDACTED, Progress, phase_seconds, redact_environment, serve_commands
from optjob.jobs.figures import gate_passed, stage_figures


def _log(*records: tuple[float, str, str]) -> list[dict]:
    return [{"time": t, "stage": stage, "step": step} for t, stage, step in records]


def test_phase_seconds_add_up_to_the_wall_time_and_name_the_waits() -> None:
    records = _log(
        (100.0, "lifecycle", "STARTING"),
        (103.0, "executor", "spawned"),
        (103.5, "lifecycle", "INPROGRESS"),
        (108.0, "download", "list"),
        (110.0, "Quantization", "start"),
        (111.0, "download", "file"),
        (115.0, "quantize", "shard"),
        (116.0, "verify", "e2e"),
        (118.0, "upload", "done"),
        (118.2, "lifecycle", "COMPLETED"),
    )
    phases = phase_seconds(records)
    assert phases["queued"] == 3.0
    assert phases["worker start"] == 0.5
    assert phases["worker start (imports)"] == 4.5
    assert phases["quantization"] == 2.0 and phases["download"] == 1.0 and phases["quantize"] == 4.0
    assert phases["upload"] == 2.2  # the commit's last gap belongs to the upload it finished
    assert round(sum(phases.values()), 3) == 18.2


def test_phase_seconds_ignore_untimed_and_out_of_order_records() -> None:
    records = [*_log((10.0, "lifecycle", "INPROGRESS"), (12.0, "upload", "done"), (11.0, "download", "file"))]
    records.append({"stage": "download", "step": "file"})  # no time: a partial line
    phases = phase_seconds(records)
    assert phases == {"worker start (imports)": 1.0, "upload": 1.0}


def test_secret_looking_environment_values_are_hidden_everywhere_in_the_request() -> None:
    request = {
        "OptimizationEnvironment": {"HF_TOKEN": "hf_x", "OPTION_TENSOR_PARALLEL_DEGREE": "4"},
        "OptimizationConfigs": [
            {
                "ModelQuantizationConfig": {
                    "OverrideEnvironment": {"AWS_SECRET_ACCESS_KEY": "s", "OPTION_QUANTIZE": "fp8"}
                }
            }
        ],
    }
    shown = redact_environment(request, ["SECRET", "TOKEN"])
    assert shown["OptimizationEnvironment"] == {"HF_TOKEN": REDACTED, "OPTION_TENSOR_PARALLEL_DEGREE": "4"}
    override = shown["OptimizationConfigs"][0]["ModelQuantizationConfig"]["OverrideEnvironment"]
    assert override == {"AWS_SECRET_ACCESS_KEY": REDACTED, "OPTION_QUANTIZE": "fp8"}
    assert request["OptimizationEnvironment"]["HF_TOKEN"] == "hf_x", "the stored request must not change"


def test_serve_commands_follow_the_image_and_the_figures() -> None:
    sharded = serve_commands("s3://out/job/", "vllm/vllm-openai:v0.32.0", {"1:Sharding": {"tensor_parallel_degree": 2}})
    assert sharded[0] == "aws s3 sync s3://out/job/ ./model"
    assert sharded[1].endswith(
        "vllm/vllm-openai:v0.32.0 --model /model --load-format sharded_state --tensor-parallel-size 2"
    )
    spec = {"method": "eagle3", "model": "/opt/ml/model/speculator", "num_speculative_tokens": 3}
    eagle = serve_commands("s3://out/e/", "763104351884.dkr.ecr.us-east-1.amazonaws.com/djl-inference:lmi",
                           {"1:SpeculativeDecoding": {"speculative_config": spec}})  # fmt: skip
    assert '-v "$PWD/model:/opt/ml/model"' in eagle[1] and "--gpus all" in eagle[1]
    assert json.loads(eagle[2].split("--speculative-config ", 1)[1].strip("'"))["model"] == "./model/speculator"
    neuron = serve_commands("s3://out/n/", "763104351884.dkr.ecr.us-east-1.amazonaws.com/djl-inference:neuronx", {})
    assert "--device /dev/neuron0" in neuron[1]
    assert serve_commands("s3://out/x/", "", {}) == []


def test_figures_separate_results_from_thresholds_and_find_acceptance() -> None:
    metrics = {
        "1:Quantization": {
            "verification": {"passed": True, "e2e": {"mean_kl": 0.0001}, "thresholds": {"e2e_max_mean_kl": 0.02}},
            "scheme": "fp8_dynamic",
            "streaming": {"phases_s": {"quantize": 1.5, "verify": 0.5}},
        },
        "2:SpeculativeDecoding": {
            "acceptance": {"mean_accepted_length": 3.5, "per_position_acceptance": [0.9, 0.7, 0.5]},
            "phases": {"train": 30.0},
        },
    }
    figures, phases, acceptance = stage_figures(metrics)
    checked = {(f.stage, f.name): f.value for f in figures if f.checked}
    other = {(f.stage, f.name): f.value for f in figures if not f.checked}
    assert checked[("1:Quantization", "verification.passed")] == "yes"
    assert checked[("1:Quantization", "verification.e2e.mean_kl")] == "0.0001"
    assert ("1:Quantization", "verification.thresholds.e2e_max_mean_kl") in other
    assert other[("1:Quantization", "scheme")] == "fp8_dynamic"
    assert checked[("2:SpeculativeDecoding", "acceptance.mean_accepted_length")] == "3.5"
    assert phases == {"1:Quantization (inside the stream)": {"quantize": 1.5, "verify": 0.5},
                      "2:SpeculativeDecoding": {"train": 30.0}}  # fmt: skip
    assert acceptance == {"2:SpeculativeDecoding acceptance": [0.9, 0.7, 0.5]}
    assert gate_passed(metrics) is True
    assert gate_passed({"1:Sharding": {"gate": {"passed": False}}, **metrics}) is False
    assert gate_passed({"1:Compilation": {"seconds": 3}}) is None


def test_progress_of_a_job_shows_its_latest_event(tmp_path) -> None:
    from optjob.jobs.store import JobRecord

    fields = {name: None for name in JobRecord.__dataclass_fields__}
    fields.update(job_key="j", account_id="0" * 12, region="us-east-1", name="j", arn="a", status="STARTING",
                  creation_time=1.0, last_modified_time=1.0, instance_type="ml.g5.2xlarge", optimization_types="|",
                  request_json="{}", plan_json="null", tags_json="[]", log_path=str(tmp_path / "log"),
                  role_source="ambient", attempts=0)  # fmt: skip
    waiting = Progress.of(JobRecord(**fields))
    assert waiting is not None and waiting.label == "waiting for a worker" and waiting.percent is None
    event = {"stage": "download", "step": "file", "fraction": 0.25, "eta_s": 75.0, "message": "1/4 weight files"}
    fields.update(status="INPROGRESS", last_event_json=json.dumps(event))
    running = Progress.of(JobRecord(**fields))
    assert (running.label, running.percent, running.eta) == ("download/file", 25.0, "1 min 15 s")
    fields.update(status="COMPLETED")
    assert Progress.of(JobRecord(**fields)) is None


def test_phase_timings_name_each_stage_by_its_optimization_type() -> None:
    from optjob.jobs.figures import phase_timings

    metrics = {
        "1:Quantization": {"streaming": {"phases_s": {"quantize": 1.5}}, "phases_s": {"load": 0.5}},
        "2:SpeculativeDecoding": {"phases": {"train": 30.0, "note": "not a number"}},
    }
    assert sorted(phase_timings(metrics)) == [
        ("Quantization", "load", 0.5),
        ("Quantization", "quantize", 1.5),
        ("SpeculativeDecoding", "train", 30.0),
    ]
