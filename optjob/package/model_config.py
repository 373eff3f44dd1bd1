"""Edits to the ``config.json`` of an artifact that every technique makes the same way."""

from __future__ import annotations

import json
from pathlib import Path

# OPTION_DTYPE values -> the name transformers records in config.json
CONFIG_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def set_config_dtype(model_dir: Path, dtype: str) -> None:
    """Record ``dtype`` (fp16 | bf16 | fp32) as the model's dtype, in the key transformers 5 reads."""
    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text())
    config["dtype"] = CONFIG_DTYPES[dtype]
    config.pop("torch_dtype", None)  # the key transformers 4 wrote; two disagreeing keys confuse loaders
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
