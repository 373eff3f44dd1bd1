"""`optjob validate` and `--help` as a user runs them: real subprocesses, exit statuses, output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "configs" / "examples"


def optjob(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "optjob", *args], input=stdin, capture_output=True, text=True, timeout=120
    )


def test_valid_spec_prints_valid_and_the_plan() -> None:
    result = optjob("validate", str(EXAMPLES / "fp8-g6-12xlarge.json"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "valid"
    assert "target: ml.g6.12xlarge: 4 x L4 (24 GiB, sm_89) [cuda]" in result.stdout
    assert "stage 1: Quantization via streaming" in result.stdout
    assert "recommended inference image: 763104351884.dkr.ecr." in result.stdout


def test_yaml_from_stdin_is_accepted() -> None:
    result = optjob("validate", "-", stdin=(EXAMPLES / "awq-g5-2xlarge.yaml").read_text())
    assert result.returncode == 0, result.stderr
    assert "A10G" in result.stdout and "Quantization via llmcompressor" in result.stdout


def test_invalid_spec_exits_1_with_every_violation() -> None:
    result = optjob("validate", str(EXAMPLES / "broken" / "several-errors.json"))
    assert result.returncode == 1
    assert result.stderr.startswith("invalid: ValidationException\n3 validation errors detected:\n")
    assert "  - Value null at 'roleArn' failed to satisfy constraint: Member must not be null" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("content", "why"), [(None, "cannot read"), ("[1, 2", "neither valid JSON"), ("- a\n- b\n", "must hold")]
)
def test_unreadable_input_exits_2(tmp_path: Path, content: str | None, why: str) -> None:
    path = tmp_path / "spec.json"
    if content is not None:
        path.write_text(content)
    result = optjob("validate", str(path))
    assert result.returncode == 2
    assert why in result.stderr


def test_every_command_explains_itself() -> None:
    top = optjob("--help")
    assert top.returncode == 0
    commands = ["validate", "create", "describe", "list", "stop", "delete", "logs", "wait", "run", "serve", "models"]
    for command in commands:
        assert command in top.stdout
        sub = optjob(command, "--help")
        assert sub.returncode == 0, (command, sub.stderr)
        assert "Usage: optjob " + command in " ".join(sub.stdout.split()), command
