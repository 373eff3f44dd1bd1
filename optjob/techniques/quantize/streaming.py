"""Data-free quantization shard by shard: FP8_DYNAMIC, FP8_BLOCK and round-to-nearest int schemes.

Weight-only-calibrated schemes need nothing but the weights, so there is no reason to build the
model: each safetensors shard is read tensor by tensor, its Linear weights are quantized and
compressed, and the output shard is written as it goes. Peak memory is about one tensor (plus the
libraries), whatever the model or shard size.

The per-tensor arithmetic and the on-disk format are llm-compressor's own: every targeted weight
goes through the same lifecycle its ``model_free_ptq`` uses (``initialize_quantized_linear`` ->
``calibrate_weight`` -> ``compress_module``), and ``config.json`` gets the ``quantization_config``
built from compressed-tensors' ``QuantizationConfig``. The output is therefore what ``oneshot``
writes for the same preset (checked tensor by tensor in tests/test_quantize_streaming.py).

What this module adds over ``model_free_ptq``: the set of tensors to quantize is the model's
actual ``nn.Linear`` modules (read from a meta-device skeleton built from ``config.json``) so
embeddings are never touched and the ``ignore`` list keeps oneshot's semantics; shards arrive as
an iterator (a downloader can yield them as they land) and each finished shard is reported
through ``on_shard_done`` (an uploader can ship it while the next one is quantized); and it
checks cancellation between tensors.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from optjob.runtime.cancel import CancelToken
from optjob.runtime.events import NULL_SINK, EventSink
from optjob.storage.inputs import SAFETENSORS_INDEX, indexed_weight_names, weight_files
from optjob.storage.safetensors_io import FLOAT_DTYPES, TORCH_TO_ST
from optjob.techniques.quantize import fp8_cpu

WEIGHTS_INDEX = SAFETENSORS_INDEX
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class ShardDone:
    """One finished output shard, as handed to ``on_shard_done``."""

    source: Path
    output: Path
    index: int
    quantized: list[str]
    bytes_written: int


@dataclass
class StreamResult:
    shards: list[ShardDone] = field(default_factory=list)
    weight_map: dict[str, str] = field(default_factory=dict)
    total_size: int = 0
    quantized_modules: list[str] = field(default_factory=list)


def torch_dtype(name: str | None) -> torch.dtype | None:
    return _DTYPES.get(name or "auto")


def linear_module_names(config_dir: Path) -> set[str]:
    """Names of every ``nn.Linear`` in the architecture, from ``config.json`` alone (meta device)."""
    from optjob.techniques.quantize.skeleton import skeleton

    return set(skeleton(config_dir).linear_modules)


def is_ignored(module_name: str, ignore: Sequence[str]) -> bool:
    """compressed-tensors matching: exact name, ``re:`` regex, or a trailing-name match."""
    from compressed_tensors.utils import match_name

    return any(match_name(module_name, pattern) or module_name.split(".")[-1] == pattern for pattern in ignore)


def build_config(preset: str, ignore: Sequence[str], *, kv_cache_scheme: Any = None) -> Any:
    """The compressed-tensors ``QuantizationConfig`` oneshot would record for ``preset``.

    Weight observers are resolved the way llm-compressor's ``QuantizationMixin`` does
    (``memoryless_minmax`` when unset) so the serialized config matches oneshot's.
    """
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        preset_name_to_scheme,
    )

    scheme = preset_name_to_scheme(preset, ["Linear"])
    if scheme.weights is not None and scheme.weights.observer is None:
        scheme.weights.observer = "memoryless_minmax"
    return QuantizationConfig(
        config_groups={"group_0": scheme},
        ignore=list(ignore),
        kv_cache_scheme=kv_cache_scheme,
        quantization_status=QuantizationStatus.INITIALIZED,
    )


def converter_for(config: Any) -> Any:
    from compressed_tensors.quantization import QuantizationConfig
    from llmcompressor.entrypoints.model_free.converter import ModelFreePtqConverter

    # Targets are decided here (real Linear modules minus ignore), so the converter sees no ignore.
    bare = QuantizationConfig(
        config_groups=config.config_groups, ignore=[], quantization_status=config.quantization_status
    )
    return ModelFreePtqConverter(bare)


def quantize_shards(
    shards: Iterable[Path],
    out_dir: Path,
    *,
    config: Any,
    linear_modules: set[str],
    dtype: torch.dtype | None = None,
    on_shard_done: Callable[[ShardDone], None] | None = None,
    cancel: CancelToken | None = None,
    events: EventSink = NULL_SINK,
    total_shards: int | None = None,
) -> StreamResult:
    """Quantize safetensors shards one at a time into ``out_dir`` (same file names).

    ``shards`` may be a lazy iterator; each is fully written (and ``on_shard_done`` called)
    before the next is read. Within a shard one tensor is in memory at a time (``storage.safetensors_io``):
    weights are read, quantized and appended; everything else is copied across as bytes.
    ``dtype`` casts floating tensors first (e.g. fp16 for targets without bf16), exactly as if
    the model had been loaded in that dtype. Index and config are written by the caller.
    """
    from transformers.initialization import no_init_weights

    from optjob.storage.safetensors_io import ShardReader, ShardWriter, header_reserve

    fp8_cpu.install()  # same bits as the library's FP8 compression, several times faster on CPU
    converter = converter_for(config)
    ignore = list(config.ignore or [])
    result = StreamResult()
    out_dir.mkdir(parents=True, exist_ok=True)
    for number, shard in enumerate(shards):
        if cancel is not None:
            cancel.raise_if_cancelled()
        out_path = out_dir / Path(shard).name
        done: list[str] = []
        with ShardReader(Path(shard)) as reader:
            names = reader.names()
            writer = ShardWriter(out_path, reserve=header_reserve(names))
            try:
                # The converter builds an nn.Linear per weight and then overwrites its parameters;
                # its random initialisation would otherwise be ~40% of the quantization time.
                with no_init_weights():
                    for name in names:
                        if cancel is not None:
                            cancel.raise_if_cancelled()
                        module, _, param = name.rpartition(".")
                        if param == "weight" and module in linear_modules and not is_ignored(module, ignore):
                            weight = reader.read(name)
                            if dtype is not None:
                                weight = weight.to(dtype)
                            for key, value in converter.process({name: weight}).items():
                                writer.add(key, value)
                            done.append(module)
                        elif _cast_needed(reader.dtype(name), dtype):
                            writer.add(name, reader.read(name).to(dtype))
                        else:
                            reader.copy_to(name, writer)  # unchanged: bytes straight across
                writer.close(metadata={"format": "pt"})
            except BaseException:
                writer.abort()
                raise
        size = writer.bytes_written
        done.sort()
        result.total_size += size
        result.weight_map.update(dict.fromkeys(writer.names(), out_path.name))
        result.quantized_modules.extend(done)
        info = ShardDone(Path(shard), out_path, number, done, size)
        result.shards.append(info)
        fraction = (number + 1) / total_shards if total_shards else None
        events("quantize", "shard", fraction, f"{out_path.name}: {len(done)} weights quantized")
        if on_shard_done is not None:
            on_shard_done(info)
    return result


def _cast_needed(st_dtype: str, dtype: torch.dtype | None) -> bool:
    return dtype is not None and st_dtype in FLOAT_DTYPES and TORCH_TO_ST[dtype] != st_dtype


def write_quantization_config(out_dir: Path, config: Any, *, dtype: str | None = None) -> dict[str, Any]:
    """Add the compressed ``quantization_config`` to ``out_dir/config.json`` the way llm-compressor does."""
    from compressed_tensors import __version__ as ct_version
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    final = QuantizationConfig(
        config_groups=config.config_groups,
        kv_cache_scheme=config.kv_cache_scheme,
        ignore=list(config.ignore or []),
        quantization_status=QuantizationStatus.COMPRESSED,
        format=_format_of(config),
    )
    data = {
        "version": ct_version,
        "quant_method": "compressed-tensors",
        "transform_config": {},
        "sparsity_config": {},
        **final.model_dump(),
    }
    path = out_dir / "config.json"
    cfg = json.loads(path.read_text())
    cfg["quantization_config"] = data
    if dtype is not None:
        cfg["dtype"] = dtype
        cfg.pop("torch_dtype", None)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return data


def _format_of(config: Any) -> str:
    from compressed_tensors.compressors.format import infer_module_format

    formats = set()
    for scheme in config.config_groups.values():
        fmt = scheme.format or infer_module_format(torch.nn.Linear, scheme)
        scheme.format = fmt
        formats.add(getattr(fmt, "value", fmt))
    return formats.pop() if len(formats) == 1 else "mixed-precision"


def quantize_checkpoint(
    input_dir: Path,
    output_dir: Path,
    *,
    preset: str,
    ignore: Sequence[str],
    dtype: str = "auto",
    shards: Iterable[Path] | None = None,
    on_shard_done: Callable[[ShardDone], None] | None = None,
    cancel: CancelToken | None = None,
    events: EventSink = NULL_SINK,
) -> StreamResult:
    """Stream-quantize a local HF directory: non-weight files copied, shards quantized, index + config.

    ``shards`` lets a caller feed the weight files lazily (a streaming download yields each as it
    lands; ``input_dir`` then needs only the non-weight files). ``config.json`` gets its
    ``quantization_config`` before the first shard, so ``on_shard_done`` can already decode it.
    """
    config = prepare_output_dir(input_dir, output_dir, preset=preset, ignore=ignore, dtype=dtype)
    names = weight_files(input_dir) if shards is None else None
    total = len(names) if names is not None else len(indexed_weight_names(input_dir) or [None])
    result = quantize_shards(
        names if names is not None else shards,
        output_dir,
        config=config,
        linear_modules=linear_module_names(input_dir),
        dtype=torch_dtype(dtype),
        on_shard_done=on_shard_done,
        cancel=cancel,
        events=events,
        total_shards=total,
    )
    if len(result.shards) > 1:
        write_index(output_dir, result.weight_map, result.total_size)
    return result


def prepare_output_dir(input_dir: Path, output_dir: Path, *, preset: str, ignore: Sequence[str], dtype: str) -> Any:
    """Copy the non-weight files and give ``config.json`` its ``quantization_config`` (before any
    shard, so a shard's check can already decode with it); returns the compressed-tensors config."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for item in input_dir.iterdir():
        if item.is_file() and not item.name.endswith(".safetensors") and item.name != WEIGHTS_INDEX:
            shutil.copy2(item, output_dir / item.name)
    config = build_config(preset, ignore)
    config_dtype = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}.get(dtype)
    write_quantization_config(output_dir, config, dtype=config_dtype)
    return config


def write_index(output_dir: Path, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (output_dir / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
