"""Safetensors shards read and written one tensor at a time, with plain file I/O.

``safetensors.torch.load_file`` / ``save_file`` hold a whole shard in memory (and a 5 GB shard is
the Hugging Face default), and ``safe_open`` maps the file so every page read stays in the
process's resident set until the file is closed. A streaming job needs neither: it reads one
tensor, quantizes it, writes the result and lets go. ``ShardReader`` reads each tensor's bytes
with ``readinto`` straight into a fresh tensor; tensors that pass through unchanged are copied
file to file in 16 MiB pieces without becoming tensors at all. ``ShardWriter`` reserves room for
the header, appends tensor data as it comes, and writes the header last, padded with spaces
(which the format allows) — so a shard is never in memory whole, on either side.

The files it writes are ordinary safetensors: tests read them back with the safetensors library
and the job's verification opens them with it too.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

import torch

_COPY_CHUNK = 16 << 20
_HEADER_ALIGN = 8

# safetensors dtype names <-> torch dtypes (those a language-model checkpoint uses).
_ST_TO_TORCH = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_TO_ST = {v: k for k, v in _ST_TO_TORCH.items()}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # the safetensors names of the floating-point dtypes


def torch_dtype(st_dtype: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (those a language-model checkpoint uses)."""
    try:
        return _ST_TO_TORCH[st_dtype]
    except KeyError:
        raise ValueError(f"safetensors dtype {st_dtype} has no torch equivalent here") from None


class ShardReader:
    """One safetensors file: its tensor table, and each tensor on demand."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file: BinaryIO = self.path.open("rb")
        (header_len,) = struct.unpack("<Q", self._file.read(8))
        header = json.loads(self._file.read(header_len))
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.table: dict[str, dict[str, Any]] = header
        self._data_start = 8 + header_len

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def names(self) -> list[str]:
        """Tensor names in the order their data lies in the file (sequential reads)."""
        return sorted(self.table, key=lambda name: self.table[name]["data_offsets"][0])

    def dtype(self, name: str) -> str:
        return self.table[name]["dtype"]

    def shape(self, name: str) -> list[int]:
        return list(self.table[name]["shape"])

    def read(self, name: str) -> torch.Tensor:
        spec = self.table[name]
        begin, end = spec["data_offsets"]
        return self._read(name, begin, end - begin).reshape(spec["shape"])

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor (its first dimension), reading only their bytes."""
        spec = self.table[name]
        shape = list(spec["shape"])
        if not shape:
            raise ValueError(f"{name} is a scalar; it has no rows")
        start, stop = max(0, start), min(stop, shape[0])
        stop = max(start, stop)
        row_bytes = (spec["data_offsets"][1] - spec["data_offsets"][0]) // shape[0] if shape[0] else 0
        flat = self._read(name, spec["data_offsets"][0] + start * row_bytes, (stop - start) * row_bytes)
        return flat.reshape([stop - start, *shape[1:]])

    def read_columns(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Columns ``start:stop`` of a 2-D tensor, reading only their bytes (one ``preadv`` per row,
        straight into the result), so a tensor-parallel rank never reads the other ranks' columns."""
        spec = self.table[name]
        rows, cols = spec["shape"]
        if not 0 <= start <= stop <= cols:
            raise ValueError(f"{name}: columns {start}:{stop} are outside its {cols} columns")
        dtype = _ST_TO_TORCH[spec["dtype"]]
        item = torch.empty(0, dtype=dtype).element_size()
        width = (stop - start) * item
        out = torch.empty(rows, width, dtype=torch.uint8)
        if not out.numel():
            return torch.empty(rows, stop - start, dtype=dtype)
        view = memoryview(out.numpy()).cast("B")
        base = self._data_start + spec["data_offsets"][0] + start * item
        fd, row_bytes = self._file.fileno(), cols * item
        for row in range(rows):
            if os.preadv(fd, [view[row * width : (row + 1) * width]], base + row * row_bytes) != width:
                raise ValueError(f"{self.path.name}: tensor {name} is cut short")
        return out.view(dtype).reshape(rows, stop - start)

    def _read(self, name: str, offset: int, length: int) -> torch.Tensor:
        dtype = _ST_TO_TORCH[self.table[name]["dtype"]]
        raw = torch.empty(length, dtype=torch.uint8)
        self._file.seek(self._data_start + offset)
        if length and self._file.readinto(raw.numpy()) != length:
            raise ValueError(f"{self.path.name}: tensor {name} is cut short")
        return raw.view(dtype)

    def copy_to(self, name: str, writer: ShardWriter) -> None:
        """Append ``name`` to ``writer`` byte for byte, never materializing it."""
        spec = self.table[name]
        begin, end = spec["data_offsets"]
        self._file.seek(self._data_start + begin)
        writer.append_raw(name, spec["dtype"], spec["shape"], self._file, end - begin)


def header_reserve(names: list[str]) -> int:
    """Bytes to set aside for the output header: generous per entry, since a quantized weight
    becomes up to four tensors (weight or weight_packed, scale, zero point, shape)."""
    size = 1024 + sum(4 * (len(name) + 192) for name in names)
    return size + (-size % _HEADER_ALIGN)


class ShardWriter:
    """Writes a safetensors file tensor by tensor; ``close`` writes the header and makes it final.

    Data goes to ``<path>.partial``; the file appears under its name only once complete.
    """

    def __init__(self, path: Path, *, reserve: int) -> None:
        self.path = Path(path)
        self._partial = self.path.with_name(self.path.name + ".partial")
        self._reserve = reserve
        self._file: BinaryIO = self._partial.open("wb")
        self._file.seek(8 + reserve)
        self._offset = 0
        self._table: dict[str, dict[str, Any]] = {}
        self.bytes_written = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.add_blocks(name, list(tensor.shape), tensor.dtype, [tensor])

    def add_blocks(self, name: str, shape: list[int], dtype: torch.dtype, blocks: Iterable[torch.Tensor]) -> None:
        """Append a tensor given as consecutive row blocks, so it need never be in memory whole."""
        st_dtype = TORCH_TO_ST.get(dtype)
        if st_dtype is None:
            raise ValueError(f"{name}: dtype {dtype} cannot be stored in safetensors")
        length = 0
        for block in blocks:
            if block.dtype != dtype:
                raise ValueError(f"{name}: a {block.dtype} block in a {dtype} tensor")
            if not block.numel():
                continue
            data = block.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
            self._file.write(memoryview(data.numpy()))
            length += data.numel()
        self._record(name, st_dtype, list(shape), length)

    def append_raw(self, name: str, dtype: str, shape: list[int], source: BinaryIO, length: int) -> None:
        left = length
        while left:
            chunk = source.read(min(_COPY_CHUNK, left))
            if not chunk:
                raise ValueError(f"{name}: source data cut short")
            self._file.write(chunk)
            left -= len(chunk)
        self._record(name, dtype, list(shape), length)

    def _record(self, name: str, dtype: str, shape: list[int], length: int) -> None:
        if name in self._table:
            raise ValueError(f"{name} written twice")
        expected = math.prod(shape) * torch.empty(0, dtype=_ST_TO_TORCH[dtype]).element_size()
        if expected != length:
            raise ValueError(f"{name}: {length} bytes for shape {shape} {dtype}")
        self._table[name] = {"dtype": dtype, "shape": shape, "data_offsets": [self._offset, self._offset + length]}
        self._offset += length
        self.bytes_written += length

    def names(self) -> list[str]:
        return list(self._table)

    def close(self, metadata: dict[str, str] | None = None) -> Path:
        header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        header.update(self._table)
        raw = json.dumps(header, separators=(",", ":")).encode()
        if len(raw) <= self._reserve:
            self._file.seek(0)
            self._file.write(struct.pack("<Q", self._reserve))
            self._file.write(raw + b" " * (self._reserve - len(raw)))
            self._file.close()
        else:  # more entries than reserved for: rewrite with the real header size (one extra copy)
            self._file.close()
            self._rewrite(raw)
        os.replace(self._partial, self.path)
        return self.path

    def abort(self) -> None:
        self._file.close()
        self._partial.unlink(missing_ok=True)

    def _rewrite(self, raw: bytes) -> None:
        padded = raw + b" " * (-len(raw) % _HEADER_ALIGN)
        moved = self._partial.with_name(self._partial.name + ".data")
        os.replace(self._partial, moved)
        with moved.open("rb") as src, self._partial.open("wb") as dst:
            dst.write(struct.pack("<Q", len(padded)))
            dst.write(padded)
            src.seek(8 + self._reserve)
            shutil.copyfileobj(src, dst, _COPY_CHUNK)
        moved.unlink()
