"""The safetensors header as a plan: which tensor lies where, parsed from bytes or computed up front.

Reading: a shard's header is the first ``8 + n`` bytes of the object, so one ranged GET tells a
streaming job every tensor's name, dtype, shape and byte range before any data arrives; tensors are
then consumed in data order (``spans``), whatever order the JSON lists them in.

Writing: an output shard's header is computed before its first tensor exists (the technique
predicts each output tensor's dtype and shape from the source header and the scheme), so the
bytes can be produced front to back and uploaded as they are made, with nothing rewritten. The
header is padded with spaces to a multiple of 8, as the format allows and the reference writer does.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from optjob.errors import InputError
from optjob.storage.untrusted_json import load_untrusted_json

ITEM_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "U64": 8, "U32": 4, "U16": 2, "F8_E8M0": 1, "F4": 1,
}  # fmt: skip
MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit


@dataclass(frozen=True)
class TensorSpan:
    """One tensor's entry: ``begin``/``end`` are offsets inside the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class ShardHeader:
    raw: bytes  # the 8-byte length and the JSON, exactly as stored
    spans: tuple[TensorSpan, ...]  # in data order
    metadata: dict[str, str]

    @property
    def data_start(self) -> int:
        return len(self.raw)

    @property
    def data_bytes(self) -> int:
        return self.spans[-1].end if self.spans else 0

    @property
    def file_bytes(self) -> int:
        return self.data_start + self.data_bytes

    def span(self, name: str) -> TensorSpan:
        for span in self.spans:
            if span.name == name:
                return span
        raise KeyError(name)


def header_length(prefix: bytes, *, what: str, file_bytes: int) -> int:
    """The JSON length the first 8 bytes announce, checked against the object's size."""
    if len(prefix) < 8:
        raise InputError(f"{what} is {file_bytes} bytes, too short for a safetensors header; re-upload it")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > MAX_HEADER_BYTES or 8 + length > file_bytes:
        raise InputError(
            f"{what} announces a {length}-byte header in a {file_bytes}-byte object: it is not a safetensors "
            "file or it is truncated. Re-upload it."
        )
    return length


def parse_header(raw: bytes, *, what: str, file_bytes: int) -> ShardHeader:
    """Parse and check a header: known dtypes, byte ranges matching shapes, no overlaps, inside the object."""
    length = header_length(raw, what=what, file_bytes=file_bytes)
    raw = bytes(raw[: 8 + length])
    table = load_untrusted_json(raw[8:], what=f"The safetensors header of {what}", fix="Re-upload it.")
    if not isinstance(table, dict):
        raise InputError(f"{what} has an unreadable safetensors header (the header is not a JSON object); re-upload it")
    metadata = table.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise InputError(f"{what} has a safetensors __metadata__ that is not a JSON object; re-upload it")
    spans = []
    for name, entry in table.items():
        try:
            dtype, shape = str(entry["dtype"]), tuple(int(x) for x in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{what}: tensor {name} has a malformed header entry ({exc}); re-upload it") from exc
        if dtype not in ITEM_BYTES:
            raise InputError(f"{what}: tensor {name} has dtype {dtype}, which safetensors does not define")
        if end - begin != math.prod(shape) * ITEM_BYTES[dtype] or begin < 0:
            raise InputError(
                f"{what}: tensor {name} ({dtype} {list(shape)}) claims bytes {begin}..{end}, which do not match "
                "its shape; the file is corrupt. Re-upload it."
            )
        spans.append(TensorSpan(name, dtype, shape, begin, end))
    spans.sort(key=lambda span: (span.begin, span.end))
    previous = 0
    for span in spans:
        if span.begin < previous:
            raise InputError(f"{what}: tensor {span.name} overlaps the tensor before it; the file is corrupt")
        previous = span.end
    if 8 + length + previous > file_bytes:
        raise InputError(
            f"{what} is {file_bytes} bytes but its header needs {8 + length + previous}: the object is "
            "truncated. Re-upload it."
        )
    return ShardHeader(raw, tuple(spans), {str(k): str(v) for k, v in metadata.items()})


def build_header(
    entries: Sequence[tuple[str, str, Sequence[int]]], metadata: dict[str, str] | None = None
) -> ShardHeader:
    """The header of a file whose tensors will be written in ``entries`` order (name, dtype, shape)."""
    table: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    spans, offset = [], 0
    for name, dtype, shape in entries:
        if name in table:
            raise ValueError(f"{name} appears twice in the output layout")
        size = math.prod(shape) * ITEM_BYTES[dtype]
        table[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        spans.append(TensorSpan(name, dtype, tuple(int(x) for x in shape), offset, offset + size))
        offset += size
    body = json.dumps(table, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return ShardHeader(struct.pack("<Q", len(body)) + body, tuple(spans), dict(metadata or {}))
