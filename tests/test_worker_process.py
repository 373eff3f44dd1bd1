"""optjob-worker as a scheduler runs it: a subprocess, a real S3 server, exit codes and the status object.

Every test reads the worker's three outputs a scheduler user has: the exit status, the
``optjob-status.json`` object at the output location, and what is (or is not) published there.
Tests marked ``needs_quantization`` run a real data-free FP8 job (ModelQuantizationConfig with
``OPTION_FP8_SCHEME=FP8_DYNAMIC``) and need the quantization technique to be registered.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from optjob.api.shapes import DescribeOptimizationJobResponse
from optjob.pipeline.stage import registered
from optjob.storage.layout import MANIFEST_NAME, STATUS_NAME
from tests.support.s3server import S3Bucket
from workers import exitcodes
from workers.status import EXTENSION

REPO = Path(__file__).resolve().parent.parent
ROLE = "arn:aws:iam::111122223333:role/optjob-worker"

needs_quantization = pytest.mark.skipif(
    "ModelQuantizationConfig" not in registered(), reason="the quantization technique is not in this build"
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from optjob.testing import build_tiny_llama

    return build_tiny_llama(
        tmp_path_factory.mktemp("tiny") / "model",
        hidden=128, intermediate=256, layers=2, heads=2, kv_heads=1, vocab=512, train_steps=0,
    )  # fmt: skip


def fp8_spec(name: str, source: str, output: str, **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "OptimizationJobName": name,
        "RoleArn": ROLE,
        "ModelSource": {"S3": {"S3Uri": source}},
        "DeploymentInstanceType": "ml.g6.12xlarge",
        "OptimizationConfigs": [
            {"ModelQuantizationConfig": {
                "OverrideEnvironment": {"OPTION_QUANTIZE": "fp8", "OPTION_FP8_SCHEME": "FP8_DYNAMIC"}}}
        ],
        "OutputConfig": {"S3OutputLocation": output},
        "StoppingCondition": {"MaxRuntimeInSeconds": 3600},
    }  # fmt: skip
    spec.update(extra)
    return spec


def worker_env(bucket: S3Bucket, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "OPTJOB_"))}
    env.update(bucket.server.aws_env())
    env.update(
        OPTJOB_HOME=str(tmp_path / "home"),
        OPTJOB_WORK_DIR=str(tmp_path / "work"),
        OPTJOB_STATUS_INTERVAL_SECONDS="0.5",
        PYTHONPATH=str(REPO),
    )
    env.update(extra)
    return env


def start_worker(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "workers", *args], cwd=REPO, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def run_worker(env: dict[str, str], *args: str, timeout: float = 120) -> tuple[int, list[dict[str, Any]], str]:
    proc = start_worker(env, *args)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, parse_log(out), err


def parse_log(out: str) -> list[dict[str, Any]]:
    """Every stdout line must be one JSON object: that is the logging contract."""
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def read_status(bucket: S3Bucket, prefix: str) -> dict[str, Any] | None:
    try:
        body = bucket.client.get_object(Bucket=bucket.name, Key=f"{prefix}{STATUS_NAME}")["Body"].read()
    except bucket.client.exceptions.NoSuchKey:
        return None
    return json.loads(body)


def as_describe(status: dict[str, Any]) -> DescribeOptimizationJobResponse:
    """The status object minus the worker's extension member is exactly a Describe response."""
    return DescribeOptimizationJobResponse.model_validate({k: v for k, v in status.items() if k != EXTENSION})


def assert_nothing_published(bucket: S3Bucket, prefix: str) -> None:
    assert bucket.keys(prefix) in ([], [f"{prefix}{STATUS_NAME}"])
    assert bucket.multipart_uploads(prefix) == []


@pytest.fixture
def source(s3_bucket: S3Bucket, tiny_model: Path) -> str:
    s3_bucket.upload_dir(tiny_model, "models/tiny")
    return s3_bucket.uri("models/tiny/")


def check_completed(bucket: S3Bucket, prefix: str, name: str, code: int, log: list[dict[str, Any]], err: str) -> None:
    assert code == exitcodes.EXIT_COMPLETED, (log[-5:], err[-3000:])
    status = read_status(bucket, prefix)
    assert status is not None
    described = as_describe(status)
    assert described.optimization_job_status == "COMPLETED"
    assert described.optimization_job_name == name
    assert described.optimization_output is not None and described.optimization_output.recommended_inference_image
    assert described.optimization_start_time is not None and described.optimization_end_time is not None
    extension = status[EXTENSION]
    assert extension["ExitCode"] == 0 and "config.json" in extension["Published"]
    assert extension["Host"]["kind"] == "cpu"
    keys = {key[len(prefix) :] for key in bucket.keys(prefix)}
    assert {"config.json", MANIFEST_NAME, STATUS_NAME, "serving.properties"} <= keys
    assert any(key.endswith(".safetensors") for key in keys)
    manifest = json.loads(bucket.client.get_object(Bucket=bucket.name, Key=prefix + MANIFEST_NAME)["Body"].read())
    assert manifest["job_name"] == name and manifest["job_arn"] == described.optimization_job_arn
    config = json.loads(bucket.client.get_object(Bucket=bucket.name, Key=prefix + "config.json")["Body"].read())
    assert config["quantization_config"]["config_groups"]  # really quantized, compressed-tensors format
    events = [line["event"] for line in log]
    assert events[0] == "host" and events[-1] == "exit" and "progress" in events
    assert log[-1]["exit_code"] == 0 and log[-1]["status"] == "COMPLETED"
    assert all(line.get("job") == name for line in log[2:])


# --- real FP8 jobs: the spec from a file, from OPTJOB_SPEC, from S3 ------------------------------


@needs_quantization
def test_fp8_job_spec_from_file(s3_bucket: S3Bucket, source: str, tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(fp8_spec("fp8-from-file", source, s3_bucket.uri("out/file/"))))
    code, log, err = run_worker(worker_env(s3_bucket, tmp_path), "--spec", str(spec_file))
    check_completed(s3_bucket, "out/file/", "fp8-from-file", code, log, err)
    assert not any((tmp_path / "work").iterdir())  # scratch space removed


@needs_quantization
def test_fp8_job_spec_from_env_yaml(s3_bucket: S3Bucket, source: str, tmp_path: Path) -> None:
    import yaml

    spec = yaml.safe_dump(fp8_spec("fp8-from-env", source, s3_bucket.uri("out/env/")))
    code, log, err = run_worker(worker_env(s3_bucket, tmp_path, OPTJOB_SPEC=spec))
    check_completed(s3_bucket, "out/env/", "fp8-from-env", code, log, err)


@needs_quantization
def test_fp8_job_spec_from_s3(s3_bucket: S3Bucket, source: str, tmp_path: Path) -> None:
    spec = fp8_spec("fp8-from-s3", source, s3_bucket.uri("out/s3/"))
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="specs/job.json", Body=json.dumps(spec).encode())
    env = worker_env(s3_bucket, tmp_path, OPTJOB_SPEC_URI=s3_bucket.uri("specs/job.json"))
    code, log, err = run_worker(env)
    check_completed(s3_bucket, "out/s3/", "fp8-from-s3", code, log, err)
    assert any(line["event"] == "spec" and "specs/job.json" in line["source"] for line in log)


# --- failures ------------------------------------------------------------------------------------


def test_no_spec_is_a_usage_error(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    code, log, _ = run_worker(worker_env(s3_bucket, tmp_path))
    assert code == exitcodes.EXIT_USAGE
    assert "no job spec" in log[1]["message"]


def test_bad_spec_fails_with_validation_errors_and_writes_nothing(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    spec = fp8_spec("bad-spec", s3_bucket.uri("models/none/"), s3_bucket.uri("out/bad/"))
    del spec["RoleArn"]
    spec["DeploymentInstanceType"] = "ml.nope.xlarge"
    code, log, _ = run_worker(worker_env(s3_bucket, tmp_path, OPTJOB_SPEC=json.dumps(spec)))
    assert code == exitcodes.EXIT_INPUT
    error = next(line for line in log if line["level"] == "error")
    assert error["code"] == "ValidationException"
    assert error["message"].startswith("2 validation errors detected:")
    assert "'roleArn'" in error["message"] and "'deploymentInstanceType'" in error["message"]
    # No valid request, so no valid Describe response: nothing at all is written.
    assert s3_bucket.keys("out/") == []


def test_unplannable_spec_writes_failed_status(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    spec = fp8_spec("bad-degree", s3_bucket.uri("models/none/"), s3_bucket.uri("out/degree/"),
                    OptimizationEnvironment={"OPTION_TENSOR_PARALLEL_DEGREE": "3"},
                    OptimizationConfigs=[{"ModelShardingConfig": {}}])  # fmt: skip
    code, log, _ = run_worker(worker_env(s3_bucket, tmp_path, OPTJOB_SPEC=json.dumps(spec)))
    assert code == exitcodes.EXIT_INPUT
    status = read_status(s3_bucket, "out/degree/")
    assert status is not None
    described = as_describe(status)
    assert described.optimization_job_status == "FAILED"
    assert "OPTION_TENSOR_PARALLEL_DEGREE" in (described.failure_reason or "")
    assert status[EXTENSION]["ExitCode"] == exitcodes.EXIT_INPUT
    assert_nothing_published(s3_bucket, "out/degree/")


@needs_quantization
def test_gated_model_without_accept_eula(s3_bucket: S3Bucket, tiny_model: Path, tmp_path: Path) -> None:
    gated = tmp_path / "gated"
    gated.mkdir()
    for path in tiny_model.iterdir():
        (gated / path.name).write_bytes(path.read_bytes())
    (gated / "README.md").write_text("---\nlicense: llama3\n---\n# A Llama 3 derivative\n")
    s3_bucket.upload_dir(gated, "models/gated")
    spec = fp8_spec("gated-no-eula", s3_bucket.uri("models/gated/"), s3_bucket.uri("out/gated/"))
    code, log, err = run_worker(worker_env(s3_bucket, tmp_path, OPTJOB_SPEC=json.dumps(spec)))
    assert code == exitcodes.EXIT_INPUT, err[-2000:]
    described = as_describe(read_status(s3_bucket, "out/gated/") or {})
    assert described.optimization_job_status == "FAILED"
    assert "AcceptEula" in (described.failure_reason or "") and "llama3" in (described.failure_reason or "")
    assert described.optimization_start_time is not None  # it started, then refused before any work
    assert_nothing_published(s3_bucket, "out/gated/")
    assert log[-1]["status"] == "FAILED"


def test_gated_source_bucket_is_refused_before_download(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    spec = fp8_spec("gated-bucket", "s3://jumpstart-private-cache-prod-us-east-1/meta-llama/",
                    s3_bucket.uri("out/gated-bucket/"))  # fmt: skip
    code, _, _ = run_worker(worker_env(s3_bucket, tmp_path, OPTJOB_SPEC=json.dumps(spec)))
    assert code == exitcodes.EXIT_INPUT
    described = as_describe(read_status(s3_bucket, "out/gated-bucket/") or {})
    assert described.optimization_job_status == "FAILED" and "AcceptEula" in (described.failure_reason or "")


def test_job_is_refused_on_a_host_without_its_toolchain(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    spec = fp8_spec("neuron-on-cpu", s3_bucket.uri("models/none/"), s3_bucket.uri("out/neuron/"),
                    DeploymentInstanceType="ml.inf2.48xlarge",
                    OptimizationEnvironment={"OPTION_TENSOR_PARALLEL_DEGREE": "2"},
                    OptimizationConfigs=[{"ModelCompilationConfig": {}}])  # fmt: skip
    env = worker_env(s3_bucket, tmp_path, OPTJOB_SPEC=json.dumps(spec), OPTJOB_NEURON_ENV=str(tmp_path / "no-env"))
    code, log, _ = run_worker(env)
    assert code == exitcodes.EXIT_HOST
    reason = as_describe(read_status(s3_bucket, "out/neuron/") or {}).failure_reason or ""
    assert "Neuron compilation for ml.inf2.48xlarge drives neuron_env, which is not installed" in reason
    assert_nothing_published(s3_bucket, "out/neuron/")


# --- stopping ------------------------------------------------------------------------------------


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def reaped() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@needs_quantization
def test_sigterm_mid_job_stops_cleanly(
    s3_bucket: S3Bucket, source: str, tmp_path: Path, reaped: list[subprocess.Popen[str]]
) -> None:
    spec = fp8_spec("sigterm-job", source, s3_bucket.uri("out/term/"))
    env = worker_env(s3_bucket, tmp_path, OPTJOB_SPEC=json.dumps(spec), OPTJOB_DEBUG_DELAY_SECONDS="60",
                     OPTJOB_STOP_GRACE_SECONDS="20")  # fmt: skip
    proc = start_worker(env)
    reaped.append(proc)

    def running() -> dict[str, Any] | None:
        status = read_status(s3_bucket, "out/term/")
        progress = (status or {}).get(EXTENSION, {}).get("Progress", {})
        return status if status and progress.get("stage") == "debug-delay" else None

    status = wait_for(running, 60, "an INPROGRESS status with progress")
    assert status["OptimizationJobStatus"] == "INPROGRESS"
    assert 0 <= status[EXTENSION]["Progress"]["fraction"] < 1
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - started < 20  # within the grace period
    assert proc.returncode == exitcodes.EXIT_STOPPED, err[-2000:]
    final = read_status(s3_bucket, "out/term/")
    assert final is not None
    described = as_describe(final)
    assert described.optimization_job_status == "STOPPED" and described.optimization_end_time is not None
    assert final[EXTENSION]["ExitCode"] == exitcodes.EXIT_STOPPED
    assert_nothing_published(s3_bucket, "out/term/")
    log = parse_log(out)
    assert any(line["event"] == "stop" and "SIGTERM" in line.get("message", "") for line in log)
    assert log[-1]["status"] == "STOPPED"
    assert not any((tmp_path / "work").iterdir())


@needs_quantization
def test_max_runtime_is_enforced_by_the_worker(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    """MaxRuntimeInSeconds is enforced by the worker itself: FAILED, MaxRuntimeExceeded, input code."""
    spec = fp8_spec("timeout-job", s3_bucket.uri("models/none/"), s3_bucket.uri("out/timeout/"),
                    StoppingCondition={"MaxRuntimeInSeconds": 2})  # fmt: skip
    env = worker_env(s3_bucket, tmp_path, OPTJOB_SPEC=json.dumps(spec), OPTJOB_DEBUG_DELAY_SECONDS="60")
    code, log, err = run_worker(env, timeout=60)
    assert code == exitcodes.EXIT_INPUT, err[-2000:]
    described = as_describe(read_status(s3_bucket, "out/timeout/") or {})
    assert described.optimization_job_status == "FAILED"
    assert (described.failure_reason or "").startswith("MaxRuntimeExceeded:")
    assert_nothing_published(s3_bucket, "out/timeout/")


# --- a pipeline killed from outside (the out-of-memory killer) -----------------------------------


def killed_pipeline(plan: Any, *, work_dir: Path, job_arn: str, events: Any, cancel: Any, **_: Any) -> Any:
    """An ``OPTJOB_PIPELINE`` that uploads part of its output, then dies as the OOM killer would end it."""
    from optjob.storage.s3 import make_client
    from optjob.storage.uri import parse_s3_uri

    location = parse_s3_uri(plan.output.s3_uri)
    make_client().put_object(Bucket=location.bucket, Key=location.child("model-00001.safetensors").key, Body=b"x")
    events("upload", "upload", 0.5, "half way")
    os.kill(os.getpid(), signal.SIGKILL)


@needs_quantization
def test_killed_pipeline_fails_as_infrastructure_and_partial_output_is_removed(
    s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="out/oom/README.keep", Body=b"was here before")
    spec = fp8_spec("oom-job", s3_bucket.uri("models/none/"), s3_bucket.uri("out/oom/"))
    env = worker_env(s3_bucket, tmp_path, OPTJOB_SPEC=json.dumps(spec),
                     OPTJOB_PIPELINE="tests.test_worker_process:killed_pipeline")  # fmt: skip
    code, log, err = run_worker(env)
    assert code == exitcodes.EXIT_INFRASTRUCTURE, err[-2000:]
    described = as_describe(read_status(s3_bucket, "out/oom/") or {})
    assert described.optimization_job_status == "FAILED"
    assert "killed by signal 9 (SIGKILL)" in (described.failure_reason or "")
    assert "out-of-memory killer" in (described.failure_reason or "")
    # What the dead pipeline uploaded is gone; what was there before the job is untouched.
    assert s3_bucket.keys("out/oom/") == ["out/oom/README.keep", f"out/oom/{STATUS_NAME}"]
    assert any(line["event"] == "cleanup" for line in log)


def stubborn_pipeline(plan: Any, *, work_dir: Path, job_arn: str, events: Any, cancel: Any, **_: Any) -> Any:
    """An ``OPTJOB_PIPELINE`` that uploads part of its output and then ignores cancellation (a hung driver)."""
    from optjob.storage.s3 import make_client
    from optjob.storage.uri import parse_s3_uri

    location = parse_s3_uri(plan.output.s3_uri)
    make_client().put_object(Bucket=location.bucket, Key=location.child("rank0.engine").key, Body=b"x")
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    events("Compilation", "build", 0.1, "building")
    time.sleep(120)


@needs_quantization
def test_stop_that_outlives_the_grace_period_kills_and_cleans_up(
    s3_bucket: S3Bucket, tmp_path: Path, reaped: list[subprocess.Popen[str]]
) -> None:
    spec = fp8_spec("hung-job", s3_bucket.uri("models/none/"), s3_bucket.uri("out/hung/"))
    env = worker_env(s3_bucket, tmp_path, OPTJOB_SPEC=json.dumps(spec), OPTJOB_STOP_GRACE_SECONDS="2",
                     OPTJOB_PIPELINE="tests.test_worker_process:stubborn_pipeline")  # fmt: skip
    proc = start_worker(env)
    reaped.append(proc)
    wait_for(lambda: "out/hung/rank0.engine" in s3_bucket.keys("out/hung/"), 30, "the partial upload")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == exitcodes.EXIT_STOPPED, err[-2000:]
    assert as_describe(read_status(s3_bucket, "out/hung/") or {}).optimization_job_status == "STOPPED"
    assert s3_bucket.keys("out/hung/") == [f"out/hung/{STATUS_NAME}"]
    events = [line["event"] for line in parse_log(out)]
    assert "stop" in events and "cleanup" in events


# --- with a control plane: the job is recorded in the store, and Stop reaches the worker --------


def control_plane_service(tmp_path: Path) -> Any:
    from optjob.jobs.service import JobService
    from optjob.settings import load_settings

    return JobService(load_settings(home=tmp_path / "home"), start_executor=False)


@needs_quantization
def test_control_plane_records_the_job(s3_bucket: S3Bucket, source: str, tmp_path: Path) -> None:
    spec = fp8_spec("cp-job", source, s3_bucket.uri("out/cp/"))
    env = worker_env(s3_bucket, tmp_path, OPTJOB_SPEC=json.dumps(spec), OPTJOB_CONTROL_PLANE="1")
    code, _, err = run_worker(env)
    assert code == exitcodes.EXIT_COMPLETED, err[-2000:]
    service = control_plane_service(tmp_path)
    described = service.describe("cp-job")
    assert described.optimization_job_status == "COMPLETED"
    record = service.get("cp-job")
    assert record.last_event is not None and Path(record.log_path).is_file()
    # The status object in S3 is the same Describe response the control plane serves.
    in_s3 = as_describe(read_status(s3_bucket, "out/cp/") or {})
    assert in_s3 == described
    # The same name again is refused without touching the finished job or its status object.
    code, log, _ = run_worker(env)
    assert code == exitcodes.EXIT_INPUT
    assert any(line.get("code") == "ResourceInUse" for line in log)
    assert as_describe(read_status(s3_bucket, "out/cp/") or {}) == described


@needs_quantization
def test_control_plane_stop_reaches_the_worker(
    s3_bucket: S3Bucket, tmp_path: Path, reaped: list[subprocess.Popen[str]]
) -> None:
    spec = fp8_spec("cp-stop", s3_bucket.uri("models/none/"), s3_bucket.uri("out/cp-stop/"))
    env = worker_env(s3_bucket, tmp_path, OPTJOB_SPEC=json.dumps(spec), OPTJOB_CONTROL_PLANE="1",
                     OPTJOB_DEBUG_DELAY_SECONDS="60")  # fmt: skip
    proc = start_worker(env)
    reaped.append(proc)
    service = control_plane_service(tmp_path)

    def in_progress() -> bool:
        try:
            return service.describe("cp-stop").optimization_job_status == "INPROGRESS"
        except Exception:
            return False

    wait_for(in_progress, 30, "the worker to claim the job")
    service.stop("cp-stop")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == exitcodes.EXIT_STOPPED, err[-2000:]
    assert service.describe("cp-stop").optimization_job_status == "STOPPED"
    assert as_describe(read_status(s3_bucket, "out/cp-stop/") or {}).optimization_job_status == "STOPPED"
