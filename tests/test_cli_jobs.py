"""The job CLI end to end: real daemons, real workers, real SIGINT for `optjob run`'s Ctrl-C."""

# Fixtures are imported from tests.support.jobs, so their parameters shadow the imports.
# ruff: noqa: F811

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

import optjob.cli.jobs  # noqa: F401  (registers the commands on the app)
from optjob.cli import app
from optjob.jobs.environment import worker_environment
from optjob.jobs.service import JobService
from optjob.pipeline.run import DEBUG_DELAY_ENV
from optjob.settings import Settings
from tests.support.jobs import (  # noqa: F401
    TEST_IMAGE,
    home,
    kill_leftovers,
    make_request,
    request_wire,
    service,
    settings,
    use_pipeline,
    wait_for,
    wait_status,
)

CLI = "import optjob.cli.jobs; from optjob.cli import app; app(prog_name='optjob')"


@pytest.fixture
def cli(settings: Settings) -> Iterator[CliRunner]:
    """In-process CLI; the daemons its commands start are killed at teardown."""
    yield CliRunner()
    kill_leftovers(settings)


def invoke(runner: CliRunner, *args: str) -> Result:
    return runner.invoke(app, list(args))


def spec_file(tmp_path: Path, name: str, **overrides: object) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(request_wire(name, **overrides)))
    return str(path)


def test_create_wait_describe_list_delete(
    cli: CliRunner, service: JobService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_pipeline(monkeypatch, "complete")
    result = invoke(cli, "create", spec_file(tmp_path, "cli-good"))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "arn:aws:sagemaker:us-east-1:000000000000:optimization-job/cli-good"

    result = invoke(cli, "wait", "cli-good")  # the daemon `create` started runs it
    assert result.exit_code == 0, result.output
    assert "RecommendedInferenceImage" in result.stdout

    result = invoke(cli, "describe", "cli-good", "--json")
    assert json.loads(result.stdout) == service.describe("cli-good").dump()
    readable = invoke(cli, "describe", "cli-good").stdout
    assert "COMPLETED" in readable and TEST_IMAGE in readable and "Compilation" in readable

    table = invoke(cli, "list").stdout
    assert "cli-good" in table and "COMPLETED" in table
    listed = json.loads(
        invoke(cli, "list", "--status", "COMPLETED", "--optimization-contains", "compil", "--json").stdout
    )
    assert [s["OptimizationJobName"] for s in listed["OptimizationJobSummaries"]] == ["cli-good"]
    assert json.loads(invoke(cli, "list", "--status", "FAILED", "--json").stdout)["OptimizationJobSummaries"] == []

    assert invoke(cli, "delete", "cli-good").exit_code == 0
    result = invoke(cli, "describe", "cli-good")
    assert result.exit_code == 1 and "ResourceNotFound" in result.stderr


def test_list_pages_and_rejects_bad_options(cli: CliRunner, service: JobService) -> None:
    for index in range(3):
        service.create(make_request(f"page-{index}"))
    first = invoke(cli, "list", "--max-results", "2")
    assert "--next-token" in first.stderr
    everything = invoke(cli, "list", "--max-results", "2", "--all", "--json").stdout
    assert everything.count('"OptimizationJobName"') == 3
    bad = invoke(cli, "list", "--max-results", "500")
    assert bad.exit_code == 1 and "ValidationException" in bad.stderr


def test_create_rejects_invalid_and_unreadable_specs(cli: CliRunner, tmp_path: Path) -> None:
    result = invoke(cli, "create", spec_file(tmp_path, "bad", DeploymentInstanceType="ml.m5.large"))
    assert result.exit_code == 1 and "ValidationException" in result.stderr
    result = invoke(cli, "create", str(tmp_path / "missing.json"))
    assert result.exit_code == 2 and "unreadable" in result.stderr


def test_wait_exit_codes_follow_the_terminal_status(
    cli: CliRunner, service: JobService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_pipeline(monkeypatch, "input_error")
    invoke(cli, "create", spec_file(tmp_path, "cli-fail"))
    result = invoke(cli, "wait", "cli-fail")
    assert result.exit_code == 1 and "config.json is missing" in result.stderr

    monkeypatch.delenv("OPTJOB_PIPELINE")
    monkeypatch.setenv(DEBUG_DELAY_ENV, "60")
    invoke(cli, "create", spec_file(tmp_path, "cli-slow"))
    assert invoke(cli, "wait", "cli-slow", "--timeout", "0.5").exit_code == 3
    result = invoke(cli, "stop", "cli-slow", "--wait")
    assert result.exit_code == 0 and "STOPPED" in result.stdout
    assert invoke(cli, "wait", "cli-slow").exit_code == 2
    result = invoke(cli, "stop", "cli-slow")
    assert result.exit_code == 1 and "ValidationException" in result.stderr
    result = invoke(cli, "delete", "cli-slow")
    assert result.exit_code == 0

    logs = invoke(cli, "logs", "cli-fail")
    assert "lifecycle/FAILED" in logs.stdout and "config.json is missing" in logs.stdout
    raw = [json.loads(line) for line in invoke(cli, "logs", "cli-fail", "--raw").stdout.splitlines()]
    assert raw[0]["step"] == "STARTING" and raw[-1]["stage"] in {"executor", "lifecycle"}


def test_logs_follow_tails_until_terminal(
    settings: Settings, service: JobService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_pipeline(monkeypatch, "complete", TEST_PIPELINE_SECONDS="1.5")
    runner = CliRunner()
    try:
        assert invoke(runner, "create", spec_file(tmp_path, "tail-me")).exit_code == 0
        result = invoke(runner, "logs", "tail-me", "--follow")
        assert result.exit_code == 0
        lines = result.stdout.splitlines()
        assert "Compilation/layers" in result.stdout and "%" in result.stdout
        assert any("lifecycle/COMPLETED" in line for line in lines)
    finally:
        kill_leftovers(settings)


def _cli_process(settings: Settings, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CLI, *args],
        env=worker_environment(settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_run_ctrl_c_stops_cleanly_and_waits_for_stopped(
    settings: Settings, service: JobService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DEBUG_DELAY_ENV, "60")
    proc = _cli_process(settings, "run", spec_file(tmp_path, "fg"))
    try:
        wait_for(lambda: service.store.get("fg") and service.get("fg").last_event)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_leftovers(settings)
    assert proc.returncode == 2, stderr
    assert "Stopping the job" in stderr and "fg: STOPPED" in stdout
    record = service.get("fg")
    assert record.status == "STOPPED"
    assert "SIGTERM" in Path(record.log_path).read_text()


def test_run_in_foreground_to_completion(
    settings: Settings, service: JobService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_pipeline(monkeypatch, "complete")
    proc = _cli_process(settings, "run", spec_file(tmp_path, "fg-ok"))
    try:
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_leftovers(settings)
    assert proc.returncode == 0, stderr
    assert "running here" in stderr  # it hosted the executor itself
    assert f"RecommendedInferenceImage: {TEST_IMAGE}" in stdout
    assert service.get("fg-ok").status == "COMPLETED"


def test_models_register_and_list(cli: CliRunner, service: JobService) -> None:
    assert invoke(cli, "models", "register", "llama-base", "s3://models-bucket/llama/").exit_code == 0
    listed = json.loads(invoke(cli, "models", "list", "--json").stdout)
    assert [(m["ModelName"], m["S3Uri"]) for m in listed] == [("llama-base", "s3://models-bucket/llama/")]
    assert "llama-base" in invoke(cli, "models", "list").stdout
    bad = invoke(cli, "models", "register", "bad name", "s3://models-bucket/x/")
    assert bad.exit_code == 1 and "ValidationException" in bad.stderr
