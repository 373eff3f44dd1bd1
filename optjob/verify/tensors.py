"""Per-tensor check: dequantize every quantized weight of the output and compare it with its source.

This part of the gate runs for any model size: both checkpoints are opened lazily, one module
(or, for a large unquantized tensor, one block of rows) is materialized at a time, and only
running aggregates are kept. It is independent of the code that quantized: it reads the output's
``quantization_config`` and decodes with compressed-tensors' own compressors (or bitsandbytes'
dequantizers), so a corrupted or mis-scaled tensor shows up whatever wrote it.

Schemes that smooth activations (AWQ, SmoothQuant) legitimately rescale each weight's input
channels and fold the inverse into the preceding norm or linear (whose output channels then
change). For them ``mode="channel_rescaled"`` compares the output with the source after fitting
per-row and per-column scales by least squares, which removes the smoothing but keeps
quantization error and corruption visible.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from optjob.storage.safetensors_io import FLOAT_DTYPES, ShardReader

Mode = Literal["direct", "channel_rescaled"]
_QUANT_SUFFIXES = (
    "weight_packed", "weight_scale", "weight_zero_point", "weight_global_scale", "weight_shape", "SCB",
    "pre_quant_scale",  # Model Optimizer's AWQ input scaling, where it is not folded into the norm before
)  # fmt: skip


@dataclass
class TensorFigures:
    """Aggregates over every quantized tensor (and the unquantized ones that should be unchanged)."""

    quantized_tensors: int = 0
    max_rel_error: float = 0.0
    mean_rel_error: float = 0.0
    min_cosine: float = 1.0
    worst_tensor: str = ""
    unquantized_tensors: int = 0
    unquantized_max_rel_error: float = 0.0
    unquantized_worst_tensor: str = ""
    mode: str = "direct"
    per_tensor: dict[str, dict[str, float]] = field(default_factory=dict)

    def as_dict(self, *, with_tensors: bool = False) -> dict[str, Any]:
        data = asdict(self)
        if not with_tensors:
            data.pop("per_tensor")
        return data


def _weight_map(model_dir: Path) -> dict[str, str]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    out: dict[str, str] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            out.update({k: file.name for k in handle.keys()})  # noqa: SIM118
    return out


class CheckpointReader:
    """One checkpoint's safetensors files, opened lazily; ``get`` materializes one tensor.

    Each file is first opened with the safetensors library (it must accept the header and offsets
    whoever wrote them); data is then read with plain file reads (``storage.safetensors_io``)
    rather than through the library's memory map, whose pages would stay in the job's resident
    set until the file is closed.
    """

    def __init__(self, model_dir: Path, stack: ExitStack, weight_map: dict[str, str] | None = None) -> None:
        self.dir = model_dir
        self.map = _weight_map(model_dir) if weight_map is None else weight_map
        self._stack = stack
        self._handles: dict[str, ShardReader] = {}

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).read(name)

    def slice(self, name: str) -> RowView:
        """A lazy view (``get_shape``, ``get_dtype``, row slicing) that reads only what is indexed."""
        return RowView(self._handle(name), name)

    def _handle(self, name: str) -> ShardReader:
        file = self.map[name]
        if file not in self._handles:
            from safetensors import safe_open

            path = self.dir / file
            with safe_open(str(path), "pt"):
                pass  # the library's own check of the header and offsets
            self._handles[file] = self._stack.enter_context(ShardReader(path))
        return self._handles[file]


class RowView:
    def __init__(self, reader: ShardReader, name: str) -> None:
        self._reader, self._name = reader, name

    def get_shape(self) -> list[int]:
        return self._reader.shape(self._name)

    def get_dtype(self) -> str:
        return self._reader.dtype(self._name)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        stop = rows.stop if rows.stop is not None else self.get_shape()[0]
        return self._reader.read_rows(self._name, rows.start or 0, stop)


def _modules(names: list[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for name in names:
        module, _, local = name.rpartition(".")
        if local in _QUANT_SUFFIXES or local == "weight":
            groups[module].append(local)
    return groups


def _ct_decoder(qconfig: dict[str, Any]) -> Any:
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    groups = []
    for group in qconfig.get("config_groups", {}).values():
        scheme = QuantizationScheme.model_validate(group)
        fmt = group.get("format") or qconfig.get("format")
        groups.append((scheme, BaseCompressor.get_value_from_registry(fmt)))
    if len(groups) != 1:
        raise ValueError(f"verification supports one config group, found {len(groups)}")
    scheme, compressor = groups[0]

    def decode(local: dict[str, torch.Tensor]) -> torch.Tensor:
        return compressor.decompress(local, scheme)["weight"]

    return decode


def _bnb_decoder(reader: CheckpointReader, qconfig: dict[str, Any]) -> Any:
    def decode(module: str) -> torch.Tensor:
        weight = reader.get(f"{module}.weight")
        if qconfig.get("_load_in_8bit") or qconfig.get("load_in_8bit"):
            scb = reader.get(f"{module}.SCB").float()
            return weight.float() * scb[:, None] / 127.0
        import bitsandbytes.functional as F

        prefix = f"{module}.weight."
        state = {k[len(prefix) :]: reader.get(k) for k in reader.map if k.startswith(prefix)}
        quant_state = F.QuantState.from_dict(state, device=torch.device("cpu"))
        return F.dequantize_4bit(weight, quant_state).float()

    return decode


def ct_scheme(qconfig: dict[str, Any]) -> Any:
    """The compressed-tensors ``QuantizationScheme`` of a one-group config (activation arguments)."""
    from compressed_tensors.quantization import QuantizationScheme

    groups = list(qconfig.get("config_groups", {}).values())
    return QuantizationScheme.model_validate(groups[0]) if len(groups) == 1 else None


def _unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """Model Optimizer packs two signed int4 values of consecutive output rows per byte, low nibble first."""
    nibbles = torch.stack([packed & 0x0F, packed >> 4], dim=1).to(torch.int8)
    nibbles = torch.where(nibbles >= 8, nibbles - 16, nibbles)
    return nibbles.reshape(packed.shape[0] * 2, packed.shape[1])


def _modelopt_weight(reader: CheckpointReader, module: str) -> torch.Tensor:
    """The effective float weight of a Model Optimizer module: FP8 x per-tensor scale, INT8 x
    per-channel scale or INT4 x per-group scale, times the ``pre_quant_scale`` (AWQ, SmoothQuant) on
    its input channels when it is stored; NVFP4 codes x block scale x tensor scale (``verify.nvfp4``)."""
    weight = reader.get(f"{module}.weight")
    if weight.dtype == torch.uint8 and f"{module}.weight_scale_2" in reader.map:  # NVFP4
        from optjob.verify import nvfp4

        block_scale, tensor_scale = reader.get(f"{module}.weight_scale"), reader.get(f"{module}.weight_scale_2")
        return nvfp4.dequantize_weight(weight, block_scale, tensor_scale)
    scale = reader.get(f"{module}.weight_scale").float()
    if weight.dtype == torch.float8_e4m3fn:
        dense = weight.float() * scale
    elif weight.dtype == torch.uint8:
        ints = _unpack_int4_rows(weight).float()
        dense = ints * scale.repeat_interleave(ints.shape[1] // scale.shape[1], dim=1)
    elif weight.dtype == torch.int8:  # SmoothQuant W8A8: one scale per output channel
        dense = weight.float() * scale.reshape(-1, 1)
    else:
        raise ValueError(f"{module}.weight is {weight.dtype}; Model Optimizer's FP8, INT8 and INT4 formats are decoded")
    if f"{module}.pre_quant_scale" in reader.map:
        dense = dense * reader.get(f"{module}.pre_quant_scale").float()[None, :]
    return dense


class WeightDecoder:
    """Which modules of a checkpoint are quantized, and each one's weight dequantized to float.

    One place that knows the on-disk layouts (compressed-tensors' compressors, bitsandbytes'
    quant states, Model Optimizer's FP8, INT8 and INT4 weights and scales), shared by the per-tensor check and the
    layer-by-layer end-to-end comparison.
    """

    def __init__(self, reader: CheckpointReader, qconfig: dict[str, Any] | None) -> None:
        self.reader = reader
        self.method = (qconfig or {}).get("quant_method")
        groups = _modules(list(reader.map))
        if self.method is None:
            self.modules: list[str] = []
        elif self.method == "compressed-tensors":
            self._decode_ct = _ct_decoder(qconfig or {})
            self._locals = groups
            self.modules = sorted(m for m, locals_ in groups.items() if "weight_scale" in locals_)
        elif self.method == "modelopt":
            # Model Optimizer's unified checkpoint: FP8 weights with one float32 weight_scale each
            self.modules = sorted(
                m for m, locals_ in groups.items() if "weight_scale" in locals_ and f"{m}.weight" in reader.map
            )
        elif self.method == "bitsandbytes":
            self._decode_bnb = _bnb_decoder(reader, qconfig or {})
            self.modules = sorted(
                m for m in groups if f"{m}.SCB" in reader.map or any(k.startswith(f"{m}.weight.") for k in reader.map)
            )
        else:
            raise ValueError(f"cannot verify quant_method {self.method!r}")
        self._quantized = set(self.modules)

    def is_quantized(self, module: str) -> bool:
        return module in self._quantized

    def owns(self, name: str) -> bool:
        """Whether ``name`` is part of a quantized module's stored weight (not a plain tensor)."""
        module, _, local = name.rpartition(".")
        if module in self._quantized and (local in _QUANT_SUFFIXES or local.startswith("weight")):
            return True
        return self.method == "bitsandbytes" and ".weight." in name and name.split(".weight.")[0] in self._quantized

    def decode(self, module: str) -> torch.Tensor:
        if self.method == "modelopt":
            return _modelopt_weight(self.reader, module)
        if self.method == "compressed-tensors":
            local = {name: self.reader.get(f"{module}.{name}") for name in self._locals[module]}
            return self._decode_ct(local)
        return self._decode_bnb(module)


_CHUNK_ELEMENTS = 1 << 22  # ~4 M elements (16 MB in float32) per step of the direct comparison


def _compare_tensor(deq: torch.Tensor, src: torch.Tensor, mode: Mode) -> tuple[float, float]:
    d = deq.reshape(src.shape) if deq.numel() == src.numel() else deq
    if d.shape != src.shape:
        return math.inf, -1.0
    if mode == "channel_rescaled" and src.ndim == 2:
        return _compare_rescaled(d.double(), src.double())
    return _compare_direct(d, src)


def _compare_direct(d: torch.Tensor, s: torch.Tensor) -> tuple[float, float]:
    """Relative L2 error and cosine of two tensors of the same shape (see ``_block_sums``)."""
    flat_d, flat_s = d.reshape(-1), s.reshape(-1)
    if flat_d.dtype == flat_s.dtype and torch.equal(flat_d, flat_s):
        return 0.0, 1.0
    return _block_sums(
        (flat_d[start : start + _CHUNK_ELEMENTS], flat_s[start : start + _CHUNK_ELEMENTS])
        for start in range(0, flat_s.numel(), _CHUNK_ELEMENTS)
    )


def _block_sums(blocks: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """Relative L2 error and cosine, from float32 dot products over blocks summed in float64.

    An embedding of a large-vocabulary model has hundreds of millions of elements: converting it
    whole to float64 (three or four temporaries) costs several times the model's size in memory,
    so the sums are built a block at a time (BLAS dot products, exact enough per 4 M-element block)
    and peak memory stays at a few blocks. A block that is unchanged costs one dot product.
    """
    sums = BlockSums()
    for d, s in blocks:
        sums.add(d, s)
    return sums.result()


class BlockSums:
    """The running sums behind ``_block_sums``, for callers that get their blocks one at a time."""

    def __init__(self) -> None:
        self.err = self.ref = self.out = self.dot = 0.0
        # Reused for every block: fresh 16 MB temporaries per block cost page faults and, with
        # the workers' allocator setting, an mmap each (verification ran ~1.7x slower).
        self._buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def add(self, d: torch.Tensor, s: torch.Tensor) -> None:
        n = s.numel()
        if self._buffers is None or self._buffers[0].numel() < n:
            self._buffers = (torch.empty(n), torch.empty(n), torch.empty(n))
        bs, bd, delta = (buf[:n] for buf in self._buffers)
        bs.copy_(s.reshape(-1))
        if d.dtype == s.dtype and torch.equal(d, s):
            same = float(torch.dot(bs, bs))
            self.ref, self.out, self.dot = self.ref + same, self.out + same, self.dot + same
            return
        bd.copy_(d.reshape(-1))
        torch.sub(bd, bs, out=delta)
        self.err += float(torch.dot(delta, delta))
        self.ref += float(torch.dot(bs, bs))
        self.out += float(torch.dot(bd, bd))
        self.dot += float(torch.dot(bd, bs))

    def result(self) -> tuple[float, float]:
        if self.err == 0.0:
            return 0.0, 1.0
        rel = math.sqrt(self.err) / max(math.sqrt(self.ref), 1e-30)
        cos = self.dot / max(math.sqrt(self.out) * math.sqrt(self.ref), 1e-30)
        return (rel if math.isfinite(rel) else math.inf), (cos if math.isfinite(cos) else -1.0)


def _compare_stored(output: CheckpointReader, source: CheckpointReader, name: str) -> tuple[float, float] | None:
    """``_compare_direct`` for a tensor both checkpoints store, read a block of rows at a time.

    Unquantized tensors (the embedding above all, 0.5 GB in a 1B model) used to be materialized
    whole on both sides just to find them equal; reading row blocks keeps memory at a few blocks.
    None when the two are not comparable (different shape, or not floating point).
    """
    out_slice, src_slice = output.slice(name), source.slice(name)
    shape = list(src_slice.get_shape())
    if list(out_slice.get_shape()) != shape:
        return None
    if out_slice.get_dtype() not in FLOAT_DTYPES or src_slice.get_dtype() not in FLOAT_DTYPES:
        return None
    if not shape:  # a scalar
        return _compare_direct(output.get(name), source.get(name))
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    step = max(1, _CHUNK_ELEMENTS // max(row, 1))
    return _block_sums((out_slice[i : i + step], src_slice[i : i + step]) for i in range(0, shape[0], step))


def _compare_rescaled(d: torch.Tensor, s: torch.Tensor) -> tuple[float, float]:
    """Alternating least squares for d ~ diag(r) @ s @ diag(c): smoothing scales input channels
    (folded into the previous norm) and output channels (of the previous linear). Linear weights
    only, so whole-tensor float64 is affordable here.

    Smoothing scales are positive. A fit that needs a zero or negative scale for a row or column
    the source uses (a zeroed or sign-flipped weight, which scaling to zero would otherwise make
    look perfect) is no smoothing: such a tensor is compared as it is."""
    r = torch.ones(s.shape[0], 1, dtype=s.dtype)
    c = torch.ones(1, s.shape[1], dtype=s.dtype)
    for _ in range(4):
        rs = r * s
        c = (d * rs).sum(0, keepdim=True) / (rs * rs).sum(0, keepdim=True).clamp_min(1e-30)
        sc = s * c
        r = (d * sc).sum(1, keepdim=True) / (sc * sc).sum(1, keepdim=True).clamp_min(1e-30)
    used_rows, used_cols = (s * s).sum(1, keepdim=True) > 0, (s * s).sum(0, keepdim=True) > 0
    if bool((r[used_rows] <= 0).any()) or bool((c[used_cols] <= 0).any()):
        return _compare_direct(d, s)
    return _compare_direct(d, r * s * c)


def quantization_config(output_dir: Path) -> dict[str, Any]:
    cfg = json.loads((output_dir / "config.json").read_text())
    qconfig = cfg.get("quantization_config")
    if not qconfig:
        raise ValueError(f"{output_dir}/config.json has no quantization_config")
    return qconfig


def iter_dequantized(reader: CheckpointReader, qconfig: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(module, dequantized weight)`` for every quantized module the reader holds, one at a time."""
    decoder = WeightDecoder(reader, qconfig)
    for module in decoder.modules:
        yield module, decoder.decode(module)


def compare_checkpoints(
    source_dir: Path, output_dir: Path, *, mode: Mode = "direct", keep_per_tensor: bool = False
) -> TensorFigures:
    """Streamed figures: relative L2 error and cosine of every dequantized weight vs its source.

    Unquantized tensors present in both checkpoints (embeddings, norms, lm_head) are compared
    too; they should match up to a dtype cast. With smoothing (``channel_rescaled``)
    norms are rescaled by design and skipped.
    """
    qconfig = quantization_config(output_dir)
    with ExitStack() as stack:
        return _compare(
            CheckpointReader(source_dir, stack), CheckpointReader(output_dir, stack), qconfig, mode, keep_per_tensor
        )


def compare_shard(
    source_file: Path, output_file: Path, qconfig: dict[str, Any], *, mode: Mode = "direct"
) -> TensorFigures:
    """The same figures for one output shard against the source shard it was made from.

    A streaming job checks each shard right after writing it, while the next one downloads, so
    verification costs no extra pass over the model; ``merge`` combines the shards' figures.
    """
    from safetensors import safe_open

    maps = []
    for file in (source_file, output_file):
        with safe_open(str(file), "pt") as handle:
            maps.append(dict.fromkeys(handle.keys(), file.name))  # noqa: SIM118
    with ExitStack() as stack:
        source = CheckpointReader(source_file.parent, stack, maps[0])
        output = CheckpointReader(output_file.parent, stack, maps[1])
        return _compare(source, output, qconfig, mode, keep_per_tensor=False)


def merge(parts: list[TensorFigures]) -> TensorFigures:
    """Whole-model figures from per-shard ones (worst cases kept, means weighted by tensor count)."""
    merged = TensorFigures(mode=parts[0].mode if parts else "direct")
    total_rel = 0.0
    for part in parts:
        total_rel += part.mean_rel_error * part.quantized_tensors
        merged.quantized_tensors += part.quantized_tensors
        merged.unquantized_tensors += part.unquantized_tensors
        if part.quantized_tensors and part.max_rel_error >= merged.max_rel_error:
            merged.max_rel_error, merged.worst_tensor = part.max_rel_error, part.worst_tensor
        merged.min_cosine = min(merged.min_cosine, part.min_cosine)
        if part.unquantized_tensors and part.unquantized_max_rel_error >= merged.unquantized_max_rel_error:
            merged.unquantized_max_rel_error = part.unquantized_max_rel_error
            merged.unquantized_worst_tensor = part.unquantized_worst_tensor
    if merged.quantized_tensors:
        merged.mean_rel_error = total_rel / merged.quantized_tensors
    return merged


def _compare(source: CheckpointReader, output: CheckpointReader, qconfig: dict[str, Any], mode: Mode,
             keep_per_tensor: bool) -> TensorFigures:  # fmt: skip
    figures = TensorFigures(mode=mode)
    total_rel = 0.0
    quantized: set[str] = set()
    for module, deq in iter_dequantized(output, qconfig):
        quantized.add(module)
        name = f"{module}.weight"
        if name not in source.map:
            raise ValueError(f"{name} is in the output but not in the source checkpoint")
        rel, cos = _compare_tensor(deq, source.get(name), mode)
        figures.quantized_tensors += 1
        total_rel += rel
        if keep_per_tensor:
            figures.per_tensor[name] = {"rel_error": rel, "cosine": cos}
        if rel >= figures.max_rel_error:
            figures.max_rel_error, figures.worst_tensor = rel, name
        figures.min_cosine = min(figures.min_cosine, cos)
    for name in output.map:
        module, _, local = name.rpartition(".")
        if module in quantized or local in _QUANT_SUFFIXES or name not in source.map:
            continue
        if module.split(".")[-1] == "weight" or ".weight." in name:
            continue  # bitsandbytes quant-state entries
        if mode == "channel_rescaled" and "norm" in module:
            continue
        compared = _compare_stored(output, source, name)
        if compared is None:
            continue
        rel, _ = compared
        figures.unquantized_tensors += 1
        if rel >= figures.unquantized_max_rel_error:
            figures.unquantized_max_rel_error, figures.unquantized_worst_tensor = rel, name
    if figures.quantized_tensors:
        figures.mean_rel_error = total_rel / figures.quantized_tensors
    return figures


class StreamChecker:
    """The same figures as ``compare_checkpoints``, from tensors already in memory as a job streams.

    A tensor-streaming job has each source weight and its compressed output in hand for a moment;
    decoding the output there, with compressed-tensors' own decompressor built from the
    ``quantization_config`` the job publishes, gives the per-tensor check without reading either
    checkpoint again. Unquantized tensors are counted: those copied byte for byte are unchanged by
    construction (and covered by the output's sha256); those cast to another dtype are compared.
    """

    def __init__(self, qconfig: dict[str, Any], mode: Mode = "direct") -> None:
        self._decode = _ct_decoder(qconfig)
        self.figures = TensorFigures(mode=mode)
        self._total_rel = 0.0

    def quantized(self, module: str, stored: dict[str, torch.Tensor], source: torch.Tensor) -> None:
        """``stored``: the module's output tensors by full name (``<module>.weight_scale``, ...)."""
        rel, cos = _compare_tensor(self.decode(module, stored), source, self.figures.mode)  # type: ignore[arg-type]
        self.record(module, rel, cos)

    def decode(self, module: str, stored: dict[str, torch.Tensor]) -> torch.Tensor:
        """The dequantized weight (or block of rows) from the module's stored tensors."""
        prefix = f"{module}."
        return self._decode({name[len(prefix) :]: value for name, value in stored.items() if name.startswith(prefix)})

    def add_block(self, sums: BlockSums, module: str, stored: dict[str, torch.Tensor], source: torch.Tensor) -> None:
        """One block of rows of a weight quantized a block at a time (direct comparison only)."""
        decoded = self.decode(module, stored)
        sums.add(decoded.reshape(source.shape), source)

    def record(self, module: str, rel: float, cos: float) -> None:
        figures = self.figures
        figures.quantized_tensors += 1
        self._total_rel += rel
        if rel >= figures.max_rel_error:
            figures.max_rel_error, figures.worst_tensor = rel, f"{module}.weight"
        figures.min_cosine = min(figures.min_cosine, cos)
        figures.mean_rel_error = self._total_rel / figures.quantized_tensors

    def unquantized(self, name: str, *, rel: float = 0.0) -> None:
        """A tensor left unquantized: ``rel`` is its error when it was cast (0 when copied byte for byte)."""
        self.figures.unquantized_tensors += 1
        if rel >= self.figures.unquantized_max_rel_error:
            self.figures.unquantized_max_rel_error, self.figures.unquantized_worst_tensor = rel, name
