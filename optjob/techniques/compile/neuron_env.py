"""The Neuron environment: where optimum-neuron 0.4.5 lives, what it holds, and how optjob talks to it.

optimum-neuron needs transformers 4.57 and the Neuron SDK; optjob runs on transformers 5, so the
two never share an interpreter. The Neuron environment is a virtual environment of its own:

* on a Neuron worker, the image's ``/opt/neuron`` (``Dockerfile.neuron``: optimum-neuron 0.4.5,
  transformers 4.57 and the SDK optimum-neuron pins), named by ``OPTJOB_NEURON_ENV``;
* on any other host, the one ``scripts/neuron_env.sh`` builds (optimum-neuron without the SDK: it
  can key and serve compile-cache hits, not compile).

optjob reaches it only through ``neuron_driver.py`` (run by path with that interpreter, JSON in and
out) and through ``optimum-cli export neuron`` itself.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from optjob.errors import InfrastructureError, ToolchainMissing, first_line

DRIVER = Path(__file__).with_name("neuron_driver.py")
ENV_VARIABLE = "OPTJOB_NEURON_ENV"
BUILD_HINT = "scripts/neuron_env.sh"
WORKER_IMAGE = "optjob-worker-neuron (built from Dockerfile.neuron)"
# The name a Neuron compile stage declares in StageNeeds.toolchain; workers check it with ``present``.
TOOLCHAIN = "neuron_env"


class NeuronEnvironment(BaseModel):
    """What ``neuron_driver.py probe`` found in the environment."""

    root: Path
    python: str
    optimum_neuron: str | None
    transformers: str | None
    neuronxcc: str | None  # the compiler's own version string; None without the SDK
    missing: list[str]
    optimum_cli: str | None

    @property
    def can_compile(self) -> bool:
        return not self.missing and self.neuronxcc is not None and self.optimum_cli is not None


def default_root(optimum_neuron: str) -> Path:
    """Where ``scripts/neuron_env.sh`` builds the environment for this optimum-neuron release."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "optjob" / "envs" / f"optimum-neuron-{optimum_neuron}"


def locate(env: Mapping[str, str], optimum_neuron: str) -> Path:
    """The environment's root: ``OPTJOB_NEURON_ENV``, else where scripts/neuron_env.sh puts it."""
    named = env.get(ENV_VARIABLE)
    root = Path(named) if named else default_root(optimum_neuron)
    if not (root / "bin" / "python").exists():
        where = f"{ENV_VARIABLE}={named}" if named else f"{root} (the default; {ENV_VARIABLE} is not set)"
        raise ToolchainMissing(
            f"Neuron compilation needs optimum-neuron {optimum_neuron} in its own environment, and there is "
            f"none at {where}. On a Neuron worker use the image {WORKER_IMAGE}; on any other host run "
            f"{BUILD_HINT} (no Neuron SDK: it serves compile-cache hits only) or set {ENV_VARIABLE}"
        )
    return root


def present(env: Mapping[str, str], optimum_neuron: str) -> bool:
    """Whether a Neuron environment is where ``locate`` looks (SDK or not: a cache hit needs none)."""
    try:
        locate(env, optimum_neuron)
    except ToolchainMissing:
        return False
    return True


def _driver(root: Path, command: str, request: dict[str, Any] | None, *, timeout_s: float) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["HF_HUB_OFFLINE"] = "1"
    try:
        done = subprocess.run(
            [str(root / "bin" / "python"), str(DRIVER), command],
            input=json.dumps(request) if request is not None else "",
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=env,
        )
    except subprocess.TimeoutExpired:
        raise InfrastructureError(
            f"The Neuron environment at {root} did not answer '{command}' within {timeout_s:.0f} s"
        ) from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise InfrastructureError(
            f"The Neuron environment at {root} failed '{command}': {lines[-1] if lines else done.returncode}. "
            f"Rebuild it with {BUILD_HINT} (or the worker image {WORKER_IMAGE})"
        )
    return json.loads(done.stdout)


def probe(root: Path) -> NeuronEnvironment:
    return NeuronEnvironment(root=root, **_driver(root, "probe", None, timeout_s=60))


def cache_entry(
    root: Path, *, model_dir: Path, model_id: str, task: str, neuron_config: Mapping[str, Any]
) -> dict[str, Any]:
    """optimum-neuron's own registry entry for this export: arch digest, hash and serialized entry."""
    try:
        return _driver(
            root,
            "cache-entry",
            {"model_dir": str(model_dir), "model_id": model_id, "task": task, "neuron_config": dict(neuron_config)},
            timeout_s=300,
        )
    except InfrastructureError as exc:
        raise InfrastructureError(f"Computing the Neuron compile-cache key failed: {first_line(exc, 600)}") from None
