"""Where the data the code reads (``configs/``) lives, and one cached YAML loader for it.

Rules are data: instance capabilities, image tables, gated sources and thresholds are YAML files
under ``configs/``. ``OPTJOB_CONFIG_DIR`` points elsewhere (a container image, a site overlay).
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any

import yaml

_REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def config_dir() -> Path:
    override = os.environ.get("OPTJOB_CONFIG_DIR")
    return Path(override) if override else _REPO_CONFIGS


@cache
def _load(path: Path) -> Any:
    with path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def load_config(name: str) -> Any:
    """Parsed contents of ``configs/<name>``; raises FileNotFoundError naming the full path."""
    path = config_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"configuration file {path} is missing (set OPTJOB_CONFIG_DIR?)")
    return _load(path)
