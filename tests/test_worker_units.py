"""The worker's parts without a server: host detection, the capability check, exit codes, status, logs."""

from __future__ import annotations

import io
import json
import stat
from pathlib import Path
from typing import Any

import botocore.parsers
import botocore.session
import pytest

from optjob.api.errors import parse
from optjob.api.shapes import CreateOptimizationJobRequest, DescribeOptimizationJobResponse
from optjob.cli.validate import read_spec
from optjob.pipeline.plan import Plan, build_plan
from workers import exitcodes
from workers.capability import refusal
from workers.host import Gpu, HostInfo, detect_host, torch_cuda_runtime
from workers.jsonlog import JsonLog
from workers.spec import SPEC_ENV, SPEC_URI_ENV, NoSpec, choose_source
from workers.state import LocalState
from workers.status import EXTENSION, StatusWriter, interval_from_env

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "configs" / "examples"
CPU = HostInfo(cpu_count=2, memory_gib=8.0)
L4 = HostInfo(cpu_count=48, memory_gib=192, gpus=(Gpu("NVIDIA L4", 23034, "8.9"),) * 4, cuda_driver_version="12.4")


def example_plan(name: str, **changes: Any) -> tuple[CreateOptimizationJobRequest, Plan]:
    raw = read_spec(str(EXAMPLES / name))
    raw.update(changes)
    request = parse(CreateOptimizationJobRequest, raw)
    return request, build_plan(request, region="us-east-1")


def cuda_compile_plan() -> Plan:
    return example_plan(
        "fp8-g6-12xlarge.json", DeploymentInstanceType="ml.p5.48xlarge", OptimizationEnvironment={},
        OptimizationConfigs=[{"ModelCompilationConfig": {}}],
    )[1]  # fmt: skip


# --- host detection ------------------------------------------------------------------------------


def _tool(bin_dir: Path, name: str, script: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def bin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A PATH holding only our fake vendor tools (plus nothing else the detector might find)."""
    path = tmp_path / "bin"
    path.mkdir()
    monkeypatch.setenv("PATH", str(path))
    return path


def test_detects_nvidia_gpus_and_cuda_version(bin_dir: Path, tmp_path: Path) -> None:
    row = "NVIDIA H100 80GB HBM3, 81559, 9.0, 570.124.06"
    _tool(bin_dir, "nvidia-smi", f"""
case "$1" in
  --query-gpu=*) printf '{row}\\n{row}\\n';;
  *) echo '| NVIDIA-SMI 570.124.06   Driver Version: 570.124.06   CUDA Version: 12.8 |';;
esac
""")  # fmt: skip
    host = detect_host(dev_dir=tmp_path)
    assert host.kind == "cuda"
    assert host.gpus == (Gpu("NVIDIA H100 80GB HBM3", 81559, "9.0"),) * 2
    assert host.cuda_driver_version == "12.8" and host.nvidia_driver_version == "570.124.06"
    assert host.summary() == "2 x NVIDIA H100 80GB HBM3 (sm_90), CUDA 12.8"
    assert json.loads(json.dumps(host.as_dict()))["kind"] == "cuda"


def test_detects_neuron_devices_with_neuron_ls(bin_dir: Path, tmp_path: Path) -> None:
    devices = [{"neuron_device": i, "nc_count": 2} for i in range(12)]
    _tool(bin_dir, "neuron-ls", f"echo '{json.dumps(devices)}'\n")
    host = detect_host(dev_dir=tmp_path)
    assert (host.kind, host.neuron_devices, host.neuron_cores) == ("neuron", 12, 24)
    assert host.summary().startswith("12 Neuron devices, 24 NeuronCores")


def test_detects_neuron_device_nodes_without_tools(bin_dir: Path, tmp_path: Path) -> None:
    for index in range(4):
        (tmp_path / f"neuron{index}").touch()
    (tmp_path / "neuron-extra").touch()
    assert detect_host(dev_dir=tmp_path).neuron_devices == 4


def test_cpu_only_host(bin_dir: Path, tmp_path: Path) -> None:
    host = detect_host(dev_dir=tmp_path)
    assert host.kind == "cpu" and host.gpus == () and host.neuron_devices == 0
    assert host.summary().startswith("CPU only (")


def test_broken_nvidia_smi_is_a_note_not_a_gpu(bin_dir: Path, tmp_path: Path) -> None:
    _tool(bin_dir, "nvidia-smi", "echo 'NVIDIA-SMI has failed' >&2; exit 9\n")
    host = detect_host(dev_dir=tmp_path)
    assert host.kind == "cpu" and "nvidia-smi is installed but failed" in host.notes[0]


def test_cuda_runtime_read_without_importing_torch() -> None:
    import torch

    assert torch_cuda_runtime() == torch.version.cuda  # None for this CPU build, e.g. "12.8" for cu128


# --- capability ----------------------------------------------------------------------------------


def test_data_free_fp8_runs_on_any_host() -> None:
    _, plan = example_plan("fp8-g6-12xlarge.json")
    assert refusal(plan, CPU) is None
    assert refusal(plan, L4) is None


def test_cuda_compilation_runs_on_any_host() -> None:
    """Model Optimizer's checkpoint does not depend on the GPU it is made on (no engine build any more)."""
    plan = cuda_compile_plan()
    assert plan.stages[0].engine == "modelopt" and not plan.stages[0].needs.accelerator
    assert refusal(plan, CPU, has_toolchain=lambda _: False) is None
    assert refusal(plan, L4) is None


def test_a_toolchain_the_host_lacks_is_named_with_how_to_get_it() -> None:
    _, plan = example_plan("neuron-compile-inf2-48xlarge.json")
    missing = refusal(plan, CPU, has_toolchain=lambda _: False) or ""
    assert missing.startswith("This host cannot run the job: Neuron compilation for ml.inf2.48xlarge drives neuron_env")
    assert "Dockerfile.neuron" in missing


def test_neuron_compilation_needs_the_compiler_not_a_device() -> None:
    _, plan = example_plan("neuron-compile-inf2-48xlarge.json")
    assert refusal(plan, CPU, has_toolchain=lambda _: True) is None
    assert "drives neuron_env, which is not installed" in (refusal(plan, CPU, has_toolchain=lambda _: False) or "")


def test_eagle_trains_on_any_host_and_a_gpu_stage_is_refused_on_a_cpu_one() -> None:
    """EAGLE-3 training uses a GPU when the host has one and the CPU otherwise (a CPU worker refuses big
    targets once config.json is known); a stage that declares it needs a GPU is refused before any download."""
    _, plan = example_plan("eagle-p5-48xlarge.json")
    assert not plan.stages[0].needs.accelerator
    assert refusal(plan, CPU) is None and refusal(plan, L4) is None
    gpu_stage = plan.stages[0].model_copy(
        update={"needs": plan.stages[0].needs.model_copy(update={"accelerator": True})}
    )
    gpu_plan = plan.model_copy(update={"stages": (gpu_stage,)})
    reason = refusal(gpu_plan, CPU) or ""
    assert "SpeculativeDecoding (eagle3) for ml.p5.48xlarge" in reason and "needs an NVIDIA GPU on this host" in reason
    assert refusal(gpu_plan, L4) is None


# --- exit codes ----------------------------------------------------------------------------------


def test_exit_codes_are_distinct_and_avoid_pythons_own() -> None:
    codes = [row[0] for row in exitcodes.TABLE]
    assert len(codes) == len(set(codes))
    assert not {1, 2} & set(codes)
    assert exitcodes.EXIT_STOPPED == 128 + 15
    assert {exitcodes.EXIT_INPUT, exitcodes.EXIT_INFRASTRUCTURE, exitcodes.EXIT_STOPPED, exitcodes.EXIT_HOST} <= set(
        codes
    )
    assert exitcodes.for_failure("input") == 65 and exitcodes.for_failure("infrastructure") == 75
    assert exitcodes.for_failure("something new") == exitcodes.EXIT_INTERNAL
    assert {exitcodes.EXIT_INFRASTRUCTURE, exitcodes.EXIT_KILLED} == exitcodes.RETRYABLE


# --- state and status ----------------------------------------------------------------------------


def test_local_state_transitions_render_valid_describe() -> None:
    request, plan = example_plan("fp8-g6-12xlarge.json", StoppingCondition={"MaxRuntimeInSeconds": 60})
    state = LocalState(request, plan, "arn:aws:sagemaker:us-east-1:000000000000:optimization-job/llama-fp8-g6")
    assert state.describe().optimization_job_status == "STARTING"
    assert state.start() and not state.start()
    assert state.describe().optimization_start_time is not None
    state.stopping("timeout")
    state.stopped("killed")
    described = state.describe()
    assert described.optimization_job_status == "FAILED"
    assert (described.failure_reason or "").startswith("MaxRuntimeExceeded:") and "60 s" in described.failure_reason
    assert described.optimization_end_time is not None

    stopped = LocalState(request, plan, state.arn)
    stopped.start()
    stopped.stopping("user")
    stopped.fail("raced", "input")  # a Stop that got there first wins
    assert stopped.describe().optimization_job_status == "STOPPED"

    refused = LocalState(request, None, state.arn)
    refused.fail("no GPU", "host")
    assert refused.describe().failure_reason == "no GPU."


def test_status_document_is_a_describe_response_botocore_can_parse() -> None:
    request, plan = example_plan("fp8-g6-12xlarge.json")
    state = LocalState(request, plan, "arn:aws:sagemaker:us-east-1:000000000000:optimization-job/llama-fp8-g6")
    state.start()
    writer = StatusWriter(state, request.output_config.s3_output_location, kms_key_id=None,
                          host=CPU.as_dict(), log=JsonLog(io.StringIO()), interval_s=30)  # fmt: skip
    assert writer.uri == "s3://optjob-output/llama-fp8-g6/optjob-status.json"
    writer.progress({"stage": "quantize", "step": "shard", "fraction": 0.25, "eta_s": 12.0, "time": 1.0, "x": 1})
    writer.progress({"stage": "verify", "step": "warning", "level": "warning", "message": "close to the gate"})
    document = writer.document()
    extension = document[EXTENSION]
    assert extension["Progress"]["stage"] == "verify" and extension["Warnings"] == ["close to the gate"]
    assert extension["Host"]["kind"] == "cpu" and "UpdatedAt" in extension
    body = {k: v for k, v in document.items() if k != EXTENSION}
    assert DescribeOptimizationJobResponse.model_validate(body).optimization_job_status == "INPROGRESS"

    model = botocore.session.get_session().get_service_model("sagemaker")
    shape = model.operation_model("DescribeOptimizationJob").output_shape
    parsed = botocore.parsers.create_parser("json").parse(
        {"body": json.dumps(document).encode(), "headers": {}, "status_code": 200}, shape
    )
    assert parsed["OptimizationJobStatus"] == "INPROGRESS" and EXTENSION not in parsed
    assert parsed["OptimizationStartTime"].timestamp() == pytest.approx(document["OptimizationStartTime"])


def test_status_interval_never_exceeds_30_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPTJOB_STATUS_INTERVAL_SECONDS", "600")
    assert interval_from_env() == 30
    monkeypatch.setenv("OPTJOB_STATUS_INTERVAL_SECONDS", "2")
    assert interval_from_env() == 2
    monkeypatch.delenv("OPTJOB_STATUS_INTERVAL_SECONDS")
    assert interval_from_env() == 30


# --- spec sources and logs -----------------------------------------------------------------------


def test_spec_source_precedence() -> None:
    env = {SPEC_ENV: '{"a": 1}', SPEC_URI_ENV: "s3://b/spec.json"}
    assert choose_source("job.yaml", env).kind == "--spec"
    assert choose_source(None, env).kind == SPEC_ENV
    assert choose_source(None, {SPEC_URI_ENV: " s3://b/spec.json "}).value == "s3://b/spec.json"
    with pytest.raises(NoSpec, match="OPTJOB_SPEC_URI"):
        choose_source(None, {SPEC_ENV: "  "})


def test_json_log_lines_and_progress_throttling() -> None:
    out = io.StringIO()
    log = JsonLog(out, progress_interval_s=60)
    log.bind("job-1")
    log.info("host", kind="cpu", skipped=None)
    for index in range(50):
        log.progress({"stage": "upload", "step": "upload", "fraction": index / 100, "time": 0})
    log.progress({"stage": "upload", "step": "upload", "fraction": 1.0})
    log.progress({"stage": "upload", "step": "warning", "level": "warning", "message": "slow"})
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines[0] == {"time": lines[0]["time"], "level": "info", "event": "host", "job": "job-1", "kind": "cpu"}
    assert lines[0]["time"].endswith("Z")
    assert [line.get("fraction") for line in lines[1:-1]] == [0.0, 1.0]  # 48 repeats throttled away
    assert lines[-1]["event"] == "warning" and lines[-1]["level"] == "warning"


def test_worker_entrypoint_usage_errors_exit_64(capsys: pytest.CaptureFixture[str]) -> None:
    from workers.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["--no-such-option"])
    assert exc.value.code == exitcodes.EXIT_USAGE
    assert main(["--check-host"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] in ("cpu", "cuda", "neuron")


def test_console_script_is_declared() -> None:
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["optjob-worker"] == "workers.__main__:main"
