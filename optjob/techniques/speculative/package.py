"""The published directory: the target exactly as the previous stage left it, plus the draft beside it.

* ``speculator/`` holds an EAGLE-3 head in speculators' format (``config.json`` + ``model.safetensors``)
  and ``evaluation.json`` (the held-out prompt ids and the figures measured on these very files), so
  anyone can reproduce the number;
* ``draft_model/`` holds a draft model the user brought;
* ``serving.properties`` keeps the previous stage's options and adds ``option.speculative_config``,
  the JSON LMI hands to vLLM's ``--speculative-config`` (paths under the serving root, where
  SageMaker and LMI mount the model directory).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from optjob.package.serving import write_serving_properties

SPECULATOR_DIR = "speculator"
DRAFT_MODEL_DIR = "draft_model"
EVALUATION_FILE = "evaluation.json"
PROPERTIES = "serving.properties"


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def copy_model(src: Path, dst: Path) -> None:
    """``src`` into ``dst`` file by file (hard links inside the job's scratch: no second copy of the weights)."""
    shutil.copytree(src, dst, copy_function=_link_or_copy, dirs_exist_ok=True)


def read_properties(directory: Path) -> dict[str, str]:
    path = directory / PROPERTIES
    props: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.lstrip().startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                props[key.strip()] = value.strip()
    return props


def speculative_config(method: str, draft_path: str, k: int) -> str:
    return json.dumps({"method": method, "model": draft_path, "num_speculative_tokens": k}, separators=(",", ":"))


def write_package_properties(
    out_dir: Path, input_dir: Path, stage_properties: Mapping[str, str], config: str, comment: str
) -> dict[str, str]:
    props = {**read_properties(input_dir), **stage_properties, "option.speculative_config": config}
    props = {k: v for k, v in props.items() if not k.startswith(("option.eagle_", "option.speculative_draft_model"))}
    props.pop("option.num_speculative_tokens", None)  # carried inside speculative_config
    (out_dir / PROPERTIES).unlink(missing_ok=True)  # may be a hard link to the previous stage's file
    write_serving_properties(out_dir, props, comments=[comment])
    return props


def write_evaluation(directory: Path, evaluation: dict[str, Any]) -> None:
    (directory / EVALUATION_FILE).write_text(json.dumps(evaluation, indent=1) + "\n", encoding="utf-8")
