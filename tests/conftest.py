"""Shared test plumbing: the real S3 server fixtures (SeaweedFS) for every test module, and the
optimum-neuron side environment for the Neuron tests."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytest_plugins = ["tests.s3server"]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def neuron_python() -> str:
    """The interpreter of optimum-neuron 0.4.5's environment (scripts/neuron_env.sh builds it once:
    about 1.5 minutes and 1.2 GB; no Neuron SDK). OPTJOB_SKIP_NEURON_CROSSCHECK=1 skips what needs it."""
    if os.environ.get("OPTJOB_SKIP_NEURON_CROSSCHECK") == "1":
        pytest.skip("OPTJOB_SKIP_NEURON_CROSSCHECK=1")
    built = subprocess.run(
        ["bash", str(ROOT / "scripts" / "neuron_env.sh")], capture_output=True, text=True, timeout=1200
    )
    assert built.returncode == 0, f"building the optimum-neuron side environment failed:\n{built.stderr[-4000:]}"
    return built.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """The interpreter of the vLLM 0.32.0 side environment (scripts/vllm_env.sh builds it once: about
    2 minutes and 3.5 GB). OPTJOB_SKIP_VLLM_CROSSCHECK=1 skips what needs it."""
    if os.environ.get("OPTJOB_SKIP_VLLM_CROSSCHECK") == "1":
        pytest.skip("OPTJOB_SKIP_VLLM_CROSSCHECK=1")
    built = subprocess.run(
        ["bash", str(ROOT / "scripts" / "vllm_env.sh")], capture_output=True, text=True, timeout=1200
    )
    assert built.returncode == 0, f"building the vLLM side environment failed:\n{built.stderr[-4000:]}"
    return built.stdout.strip().splitlines()[-1]
