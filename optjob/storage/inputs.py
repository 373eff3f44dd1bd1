"""Is this directory a model we may safely load? Checked before any optimization runs.

A model arrives from someone else's bucket, so nothing in it is trusted: paths must stay inside
the directory (no ``..``, absolute paths, links or device files), pickle weights are refused by
default because unpickling runs arbitrary code, and the safetensors files must agree with their
headers and index so a truncated upload fails here, with its file named, rather than as a cryptic
error deep inside a quantizer. Each failure is its own InputError: the message is the job's
FailureReason, so it names the file and says what to do.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
import stat
import struct
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict

from optjob.errors import InputError
from optjob.limits import limits
from optjob.storage.untrusted_json import load_untrusted_json

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle")
SAFETENSORS_INDEX = "model.safetensors.index.json"
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
# Bits per element of every safetensors dtype (sub-byte float formats included).
_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64,
    "I64": 64, "U64": 64, "F64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip


class ModelDirReport(BaseModel):
    """What the check found: the files, the weights, and whether the model ships its own code."""

    model_config = ConfigDict(frozen=True)

    path: Path
    model_type: str | None
    files: list[str]
    safetensors_files: list[str]
    pickle_files: list[str]
    has_index: bool
    tensor_count: int
    total_bytes: int
    custom_code: bool
    """config.json has ``auto_map``: loading it needs trust_remote_code, which stays off unless allowed."""


def safe_relative_path(name: str, *, what: str) -> PurePosixPath:
    """``name`` as a relative path that stays inside its root, or InputError naming ``what``.

    Used for S3 keys below a prefix and archive member names: both are attacker-chosen strings
    that become local file paths.
    """
    fix = "Re-create it with plain relative paths inside the model directory."
    if not name or "\x00" in name:
        raise InputError(f"{what} {name!r} has an empty or NUL-containing path. {fix}")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise InputError(f"{what} {name!r} is an absolute path, which could write outside the model. {fix}")
    if "\\" in name:
        raise InputError(f"{what} {name!r} contains a backslash; use '/' as the separator. {fix}")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise InputError(f"{what} {name!r} contains '..', which could write outside the model. {fix}")
    if "//" in name.rstrip("/"):
        raise InputError(f"{what} {name!r} contains an empty path segment ('//'). {fix}")
    return PurePosixPath(*parts)


def is_model_file(rel: str) -> bool:
    """Whether a source file is part of a model (``configs/limits.yaml`` ``model_files.keep``, on its
    name): the rest of a prefix or archive, a model's own Python code included, is left behind."""
    name = PurePosixPath(rel).name.lower()
    return any(fnmatch.fnmatchcase(name, pattern.lower()) for pattern in limits().model_files.keep)


def dropped_warning(dropped: list[str]) -> list[str]:
    """The manifest warning naming the source files that were not carried through (none: [])."""
    if not dropped:
        return []
    code = [rel for rel in dropped if rel.lower().endswith(".py")]
    shown = ", ".join(sorted(dropped)[:5]) + (f" and {len(dropped) - 5} more" if len(dropped) > 5 else "")
    why = "; the model's own Python code (auto_map) is never run or republished" if code else ""
    return [f"{len(dropped)} source file(s) that are not model files were left out: {shown}{why}"]


def _walk(root: Path) -> list[tuple[str, os.stat_result]]:
    """Every regular file under ``root`` (relative posix path, lstat), refusing anything else."""
    found: list[tuple[str, os.stat_result]] = []
    stack = [root]
    while stack:
        directory = stack.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                path = Path(entry.path)
                rel = path.relative_to(root).as_posix()
                info = entry.stat(follow_symlinks=False)
                if stat.S_ISLNK(info.st_mode):
                    raise InputError(
                        f"Model file {rel} is a symbolic link; links could expose files outside the model. "
                        "Upload the file itself instead of a link."
                    )
                if stat.S_ISDIR(info.st_mode):
                    stack.append(path)
                elif not stat.S_ISREG(info.st_mode):
                    raise InputError(
                        f"Model file {rel} is a device, FIFO or socket, not a regular file. "
                        "Remove it from the model directory."
                    )
                elif info.st_nlink > 1:
                    raise InputError(
                        f"Model file {rel} is a hard link ({info.st_nlink} names share its data). "
                        "Upload a plain copy of the file."
                    )
                else:
                    found.append((rel, info))
    return sorted(found)


def _read_json(path: Path, rel: str, fix: str) -> Any:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{rel} cannot be read ({exc}). {fix}") from exc
    return load_untrusted_json(raw, what=rel, fix=fix)


def safetensors_header(path: Path, rel: str) -> dict[str, Any]:
    """The tensor table of a safetensors file, after checking it agrees with the file's size.

    Layout: 8-byte little-endian header length N, N bytes of JSON, then the tensor data, whose
    offsets must tile the data region exactly. A file cut short by an interrupted upload fails
    here with its name rather than later as an obscure loader error.
    """
    fix = "Re-upload the file; it is truncated or not a safetensors file."
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise InputError(f"{rel} is {size} bytes, too short for a safetensors header. {fix}")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
            raise InputError(f"{rel} declares a {header_len}-byte header but the file is {size} bytes. {fix}")
        raw = handle.read(header_len)
    header = load_untrusted_json(raw, what=f"The safetensors header of {rel}", fix=fix)
    if not isinstance(header, dict):
        raise InputError(f"{rel} has a safetensors header that is not a JSON object. {fix}")
    tensors = {name: spec for name, spec in header.items() if name != "__metadata__"}
    data_len = size - 8 - header_len
    spans = []
    for name, spec in tensors.items():
        try:
            dtype, shape, (begin, end) = str(spec["dtype"]), spec["shape"], spec["data_offsets"]
            begin, end = int(begin), int(end)
            elements = math.prod(int(dim) for dim in shape)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise InputError(f"{rel}: tensor {name[:200]!r} has a malformed header entry. {fix}") from exc
        bits = _DTYPE_BITS.get(dtype)
        if bits is not None and (end - begin) * 8 != elements * bits:
            raise InputError(
                f"{rel}: tensor {name!r} ({dtype}, shape {shape}) needs {elements * bits // 8} bytes but "
                f"its header gives it {end - begin}. {fix}"
            )
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position or end < begin:
            raise InputError(f"{rel}: tensor {name!r} data offsets overlap or leave a gap. {fix}")
        position = end
    if position != data_len:
        raise InputError(
            f"{rel}: the header describes {position} bytes of tensor data but the file holds {data_len}. {fix}"
        )
    return tensors


_INDEX_FIX = "Upload every shard the index names, or regenerate the index with save_pretrained."


def indexed_weight_names(model_dir: Path) -> list[str]:
    """The shard file names a local model's index lists, in index order ([] without an index)."""
    index = model_dir / SAFETENSORS_INDEX
    if not index.is_file():
        return []
    return list(dict.fromkeys(index_weight_map(model_dir).values()))


def weight_files(model_dir: Path) -> list[Path]:
    """A local model's safetensors shards in index order (or the files themselves, sorted)."""
    if (model_dir / SAFETENSORS_INDEX).is_file():
        return [model_dir / name for name in indexed_weight_names(model_dir)]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights")
    return files


def index_weight_map(root: Path) -> dict[str, str]:
    """The index's tensor -> shard map, shard paths checked for safety."""
    index = _read_json(root / SAFETENSORS_INDEX, SAFETENSORS_INDEX, _INDEX_FIX)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{SAFETENSORS_INDEX} has no weight_map. {_INDEX_FIX}")
    return {
        tensor: safe_relative_path(str(shard), what=f"{SAFETENSORS_INDEX} shard").as_posix()
        for tensor, shard in weight_map.items()
    }


def check_shard_against_index(weight_map: dict[str, str], shard: str, header: dict[str, Any]) -> None:
    """Every tensor the index places in ``shard`` is in its header (checked as each shard lands)."""
    for tensor in sorted(t for t, where in weight_map.items() if where == shard):
        if tensor not in header:
            raise InputError(
                f"{SAFETENSORS_INDEX} places tensor {tensor!r} in {shard}, whose header lacks it. {_INDEX_FIX}"
            )


def _check_index(root: Path, present: set[str], headers: dict[str, dict[str, Any]]) -> None:
    weight_map = index_weight_map(root)
    for shard in sorted(set(weight_map.values())):
        if shard not in present:
            raise InputError(f"{SAFETENSORS_INDEX} names shard {shard}, which is missing. {_INDEX_FIX}")
        check_shard_against_index(weight_map, shard, headers[shard])


_CONFIG_FIX = "Fix or re-upload config.json."
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")


def read_config(path: Path) -> dict[str, Any]:
    """A model's config.json, parsed within the limits and its sizing numbers in their plausible
    ranges (``configs/limits.yaml`` ``model.config_ranges``); InputError naming the field otherwise.

    Called as soon as config.json arrives, before any tensor is read, because a job's memory and
    time grow with these numbers."""
    config = _read_json(path, "config.json", _CONFIG_FIX)
    if not isinstance(config, dict):
        raise InputError(f"config.json is not a JSON object. {_CONFIG_FIX}")
    check_config_values(config)
    if (path.parent / SAFETENSORS_INDEX).is_file():  # the index names every tensor before any shard arrives
        try:
            names = index_weight_map(path.parent)
        except InputError:
            pass  # a broken index is reported, with its own fix, by the checks that read it
        else:
            _check_layers(config, _layers_named(names))
    return config


def check_config_values(config: dict[str, Any]) -> None:
    """Every sizing number, at the top level and in nested configs (``text_config`` ...), in range."""
    ranges = limits().model.config_ranges
    stack: list[tuple[str, dict[str, Any]]] = [("", config)]
    while stack:
        where, section = stack.pop()
        for key, value in section.items():
            if isinstance(value, dict):
                stack.append((f"{where}{key}.", value))
                continue
            if key not in ranges or value is None:
                continue
            low, high = ranges[key]
            # some architectures give one value per layer (a list); each must be in range
            for item in value if isinstance(value, list) else [value]:
                integral = isinstance(item, int) or (isinstance(item, float) and item.is_integer())
                if isinstance(item, bool) or not integral:
                    raise InputError(f"config.json {where}{key} is {str(value)[:64]!r}, not an integer. {_CONFIG_FIX}")
                if not low <= item <= high:
                    raise InputError(
                        f"config.json {where}{key} is {str(value)[:64]}, outside the plausible range {low}..{high} "
                        f"(configs/limits.yaml). {_CONFIG_FIX}"
                    )


def check_config_against_weights(config: dict[str, Any], headers: dict[str, dict[str, Any]]) -> None:
    """The safetensors headers are the truth: a config.json that claims more layers or a larger
    vocabulary than the weights hold is refused with both numbers (a loader would otherwise build,
    and an optimizer walk, a model the weights cannot fill)."""
    embedding_rows: int | None = None
    for table in headers.values():
        for name, spec in table.items():
            if embedding_rows is None and name.endswith(_EMBEDDINGS) and spec.get("shape"):
                embedding_rows = int(spec["shape"][0])
    _check_layers(config, _layers_named(name for table in headers.values() for name in table))
    vocab = config.get("vocab_size")
    if embedding_rows is not None and isinstance(vocab, int) and vocab > embedding_rows:
        raise InputError(
            f"config.json vocab_size is {vocab} but the safetensors embedding holds {embedding_rows} rows. "
            + _CONFIG_FIX
        )


def _layers_named(names: Iterable[str]) -> set[int]:
    return {int(match.group(1)) for name in names if (match := _LAYER.search(name))}


def _check_layers(config: dict[str, Any], layers: set[int]) -> None:
    claimed = config.get("num_hidden_layers")
    if layers and isinstance(claimed, int) and claimed > len(layers):
        raise InputError(
            f"config.json num_hidden_layers is {claimed} but the safetensors weights hold {len(layers)} layers "
            f"(layers.0 to layers.{max(layers)}). {_CONFIG_FIX}"
        )


def check_model_dir(path: Path | str, *, allow_pickle: bool = False) -> ModelDirReport:
    """Check ``path`` is a safe, complete Hugging Face model directory; InputError otherwise."""
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"The model directory {root} does not exist or is not a directory.")
    entries = _walk(root)
    names = {rel for rel, _ in entries}
    if "config.json" not in names:
        raise InputError(
            "The model has no config.json at its top level. Point ModelSource.S3.S3Uri at the directory "
            "that holds config.json (a Hugging Face save_pretrained layout)."
        )
    config = read_config(root / "config.json")
    pickles = [rel for rel in names if rel.lower().endswith(PICKLE_SUFFIXES)]
    if pickles and not allow_pickle:
        raise InputError(
            f"The model contains pickle weights ({', '.join(sorted(pickles)[:5])}); loading pickle files can "
            "run arbitrary code, so they are refused as unsafe. Convert the weights to safetensors, or enable the "
            "allow-pickle option if you trust their origin (they are then loaded with weights_only=True)."
        )
    headers = {rel: safetensors_header(root / rel, rel) for rel in sorted(names) if rel.endswith(".safetensors")}
    if SAFETENSORS_INDEX in names:
        _check_index(root, set(headers), headers)
    check_config_against_weights(config, headers)
    if not headers and not pickles:
        raise InputError("The model directory has config.json but no weights (*.safetensors). Upload the weight files.")
    return ModelDirReport(
        path=root,
        model_type=config.get("model_type") if isinstance(config.get("model_type"), str) else None,
        files=sorted(names),
        safetensors_files=sorted(headers),
        pickle_files=sorted(pickles),
        has_index=SAFETENSORS_INDEX in names,
        tensor_count=sum(len(table) for table in headers.values()),
        total_bytes=sum(info.st_size for _, info in entries),
        custom_code="auto_map" in config,
    )


def load_pickle_weights(path: Path | str) -> dict[str, Any]:
    """Load pickle weights that were explicitly allowed, with ``weights_only=True``.

    weights_only restricts unpickling to tensors and plain containers, so a file that smuggles
    code fails to load instead of running it.
    """
    import pickle

    import torch

    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise InputError(
            f"{Path(path).name} could not be loaded as plain tensors with weights_only=True ({exc}); "
            "it may contain code. Convert it to safetensors in a trusted environment."
        ) from exc
    if not isinstance(state, dict):
        raise InputError(f"{Path(path).name} does not hold a state dict (found {type(state).__name__}).")
    return state
