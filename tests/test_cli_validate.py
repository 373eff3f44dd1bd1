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


def test_model_config_is_checked_against_the_techniques(tmp_path: Path) -> None:
    import json

    config = {"architectures": ["LlamaForCausalLM"], "num_attention_heads": 8, "num_key_value_heads": 2,
              "hidden_size": 64, "intermediate_size": 128, "vocab_size": 500, "num_hidden_layers": 2,
              "dtype": "bfloat16"}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = str(EXAMPLES / "shard-tp2-g6-12xlarge.json")
    fits = optjob("validate", spec, "--model-config", str(tmp_path))
    assert fits.returncode == 0, fits.stderr
    assert "stage 1: Sharding" in fits.stdout

    (tmp_path / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 3, "num_attention_heads": 6}))
    breaks = optjob("validate", spec, "--model-config", str(tmp_path / "config.json"))
    assert breaks.returncode == 1
    assert breaks.stderr.startswith("invalid: ValidationException\n1 problem with the model for this request:\n")
    assert "num_key_value_heads=3 is not divisible by the degree 2" in breaks.stderr
    assert "(4 GPUs) use one of 1" in breaks.stderr

    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    other = optjob("validate", spec, "--model-config", str(tmp_path))
    assert other.returncode == 1 and "this model is GPT2LMHeadModel" in other.stderr
    assert optjob("validate", spec, "--model-config", str(tmp_path / "missing.json")).returncode == 2
