"""Produce a safetensors file front to back from a header computed up front.

The header (``header.build_header``) fixes every tensor's name, dtype, shape and position before
the first byte is written, so the file can go straight into a byte sink (a multipart upload, a
local file) without seeking back. This writer holds the producer to that plan: tensors must come
in the header's order with exactly the announced dtype, shape and size, and ``close`` refuses a
file with tensors missing, so a wrong prediction is a loud error, never a corrupt shard.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch

from optjob.storage.safetensors_io import TORCH_TO_ST
from optjob.storage.tensorstream.header import ShardHeader


class ByteSink(Protocol):
    def write(self, data: bytes | bytearray | memoryview) -> None: ...


class PlannedShardWriter:
    def __init__(self, header: ShardHeader, sink: ByteSink, *, what: str) -> None:
        self.header = header
        self.sink = sink
        self.what = what
        self._next = 0
        sink.write(header.raw)

    def _expect(self, name: str) -> int:
        if self._next >= len(self.header.spans):
            raise ValueError(f"{self.what}: {name} is not in the planned layout (all tensors already written)")
        span = self.header.spans[self._next]
        if span.name != name:
            raise ValueError(f"{self.what}: expected {span.name} next in the planned layout, got {name}")
        return span.nbytes

    def add(self, name: str, tensor: torch.Tensor) -> None:
        span = self.header.spans[self._next] if self._next < len(self.header.spans) else None
        self._expect(name)
        assert span is not None
        dtype = TORCH_TO_ST.get(tensor.dtype)
        if dtype != span.dtype or tuple(tensor.shape) != span.shape:
            raise ValueError(
                f"{self.what}: {name} is {dtype} {list(tensor.shape)}, the planned layout says "
                f"{span.dtype} {list(span.shape)}"
            )
        if tensor.numel():
            data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
            self.sink.write(memoryview(data.numpy()))
        self._next += 1

    def add_raw(self, name: str, pieces: Iterable[memoryview]) -> None:
        """A tensor given as its bytes (a pass-through tensor streamed piece by piece)."""
        expected = self._expect(name)
        written = 0
        for piece in pieces:
            self.sink.write(piece)
            written += len(piece)
        if written != expected:
            raise ValueError(f"{self.what}: {name} has {written} bytes, the planned layout says {expected}")
        self._next += 1

    def check_complete(self) -> None:
        if self._next != len(self.header.spans):
            missing = self.header.spans[self._next].name
            raise ValueError(
                f"{self.what}: {missing} and {len(self.header.spans) - self._next - 1} more were never written"
            )
