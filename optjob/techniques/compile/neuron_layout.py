"""What a compiled Neuron model directory must hold before it is published.

optimum-neuron 0.4.5 loads a directory (``NxDPreTrainedModel._from_pretrained`` and
``load_weights``) from ``config.json``, ``neuron_config.json`` (strictly: its optimum-neuron and
compiler versions must equal the installed ones) and ``model.pt`` (the TorchScript wrapper of the
NEFFs), then takes the weights either pre-sharded, ``checkpoint/weights/tp{rank}_sharded_checkpoint
.safetensors`` for every rank (what ``optimum-cli export neuron`` writes for a local model), or as
the Hugging Face safetensors beside them, sharded at load time (what a compile-cache hit publishes).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from optjob.techniques.compile.neuron_cache import is_torchscript_archive

REQUIRED = ("config.json", "neuron_config.json", "model.pt")
SHARDS = "checkpoint/weights"


def shard_name(rank: int) -> str:
    return f"{SHARDS}/tp{rank}_sharded_checkpoint.safetensors"


def layout_problems(directory: Path, neuron_config: Mapping[str, Any]) -> list[str]:
    """Everything that stops optimum-neuron from loading ``directory`` as planned (empty when none)."""
    problems = [f"{name} is missing" for name in REQUIRED if not (directory / name).is_file()]
    if problems:
        return problems
    try:
        written = json.loads((directory / "neuron_config.json").read_text(encoding="utf-8"))
    except ValueError as exc:
        return [f"neuron_config.json is not JSON ({exc})"]
    for key in sorted(set(neuron_config) | set(written)):
        if written.get(key) != neuron_config.get(key):
            problems.append(
                f"neuron_config.json has {key}={written.get(key)!r} where the plan has {neuron_config.get(key)!r}"
            )
    if not is_torchscript_archive(directory / "model.pt"):
        problems.append("model.pt is not a TorchScript archive")
    degree = int(neuron_config["tp_degree"])
    if (directory / SHARDS).is_dir():
        ranks = sorted(p.name for p in (directory / SHARDS).glob("tp*_sharded_checkpoint.safetensors"))
        expected = sorted(Path(shard_name(rank)).name for rank in range(degree))
        if ranks != expected:
            problems.append(
                f"{SHARDS} holds {ranks or 'no shards'} where tensor-parallel degree {degree} needs {expected}"
            )
    elif not list(directory.glob("*.safetensors")):
        problems.append(f"no weights: neither {SHARDS}/ (pre-sharded) nor *.safetensors (sharded on load)")
    return problems
