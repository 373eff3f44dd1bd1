"""Streams a checkpoint into vLLM ``sharded_state`` part files, one tensor at a time.

Source shards are opened as they arrive (a downloader may still be fetching later ones). The ranks
are written one after the other: for each of vLLM's tensors, in vLLM's order, the rank's piece is
cut from the source (reading only the rows it needs where the split allows) and appended to the
rank's open part file. A part closes exactly where vLLM's own ``ShardedStateLoader.save_model``
would close it, before the tensor that would take it past the part size, and goes to the gate and
then to the uploader: with vLLM's 5 GiB parts a rank is usually one file, and writing rank
by rank is what lets rank 0 be checked and uploaded while rank 1 is written. Memory is one source
tensor and one piece of it, whatever the model size.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from optjob.errors import InputError
from optjob.runtime.cancel import CancelToken
from optjob.runtime.events import NULL_SINK, EventSink
from optjob.storage.safetensors_io import ShardReader, ShardWriter
from optjob.techniques.shard.layout import (
    Entry,
    Geometry,
    RowBlocks,
    SourceAccess,
    Splitter,
    entries,
    file_name,
)

# Source tensors vLLM's loaders skip rather than refuse (rotary caches some exporters save).
_IGNORED_SOURCE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


class SourceTensors:
    """The checkpoint's tensors by name, across shards that are opened as they arrive."""

    def __init__(self, shards: Iterable[Path]) -> None:
        self._pending: Iterator[Path] = iter(shards)
        self._readers: list[ShardReader] = []
        self._where: dict[str, ShardReader] = {}
        self.used: set[str] = set()

    def _open(self, path: Path) -> None:
        reader = ShardReader(path)
        self._readers.append(reader)
        for tensor in reader.names():
            self._where.setdefault(tensor, reader)

    def _reader(self, name: str) -> ShardReader:
        while name not in self._where:
            path = next(self._pending, None)
            if path is None:
                raise InputError(
                    f"the checkpoint has no tensor {name}, which vLLM's model holds; re-export the model with "
                    "all its weights (or check that config.json matches the checkpoint)"
                )
            self._open(path)
        self.used.add(name)
        return self._where[name]

    def shape(self, name: str) -> list[int]:
        return self._reader(name).shape(name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._reader(name).read_rows(name, start, stop)

    def columns(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._reader(name).read_columns(name, start, stop)

    def whole(self, name: str) -> torch.Tensor:
        return self._reader(name).read(name)

    def access(self) -> SourceAccess:
        return SourceAccess(self.shape, self.rows, self.columns, self.whole)

    def unused(self, geo: Geometry) -> list[str]:
        """Source tensors vLLM's model has no place for (after every shard has been opened)."""
        for path in self._pending:
            self._open(path)
        left = sorted(set(self._where) - self.used)
        if geo.tied:  # vLLM ties the LM head to the embedding and skips a stored copy
            left = [name for name in left if name != "lm_head.weight"]
        return [name for name in left if not _IGNORED_SOURCE.search(name)]

    def close(self) -> None:
        for reader in self._readers:
            reader.close()


@dataclass
class Part:
    """One part number's files, one per rank, with the entries they hold (in order)."""

    number: int
    paths: list[Path]
    entries: list[Entry]
    bytes_per_rank: int


@dataclass
class WriteReport:
    parts: list[Part] = field(default_factory=list)
    tensors_per_rank: int = 0
    bytes_per_rank: int = 0


def _reserve(names: list[str]) -> int:
    """Header room for a part: every name plus its dtype, shape and offsets (rarely exceeded; the
    writer rewrites the file once if it is)."""
    size = 256 + sum(len(name) + 96 for name in names)
    return size + (-size % 8)


def write_parts(
    source: SourceTensors,
    geo: Geometry,
    degree: int,
    out_dir: Path,
    *,
    part_max_bytes: int,
    on_file: Callable[[Path, int, list[Entry]], None],
    cancel: CancelToken | None = None,
    events: EventSink = NULL_SINK,
) -> WriteReport:
    """Write every rank's part files into ``out_dir``, one rank after the other.

    ``on_file(path, rank, entries)`` gets each file as soon as it is closed, with the tensors it
    holds: the gate checks it and the uploader ships it while the next one is written.
    """
    plan = entries(geo)
    splitter = Splitter(geo, degree, source.access())
    reserve = _reserve([entry.name for entry in plan])
    report = WriteReport(tensors_per_rank=len(plan))
    out_dir.mkdir(parents=True, exist_ok=True)
    total = degree * len(plan)

    def close(writer: ShardWriter, rank: int, number: int, group: list[Entry], part_bytes: int) -> None:
        path = writer.close()
        if rank == 0:
            report.parts.append(Part(number, [], group, part_bytes))
            report.bytes_per_rank += part_bytes
        part = report.parts[number]
        part.paths.append(path)
        if part.entries != group or part.bytes_per_rank != part_bytes:
            raise AssertionError(f"rank {rank}'s part {number} differs in layout from rank 0's")
        on_file(path, rank, group)

    for rank in range(degree):
        number, part_bytes, group = 0, 0, []
        writer = ShardWriter(out_dir / file_name(rank, number), reserve=reserve)

        try:
            for index, entry in enumerate(plan):
                if cancel is not None:
                    cancel.raise_if_cancelled()
                piece = splitter.piece(entry, rank)
                size = piece.nbytes if isinstance(piece, RowBlocks) else piece.numel() * piece.element_size()
                if part_bytes + size > part_max_bytes:  # vLLM's rule, even for an empty part
                    close(writer, rank, number, group, part_bytes)
                    number, part_bytes, group = number + 1, 0, []
                    writer = ShardWriter(out_dir / file_name(rank, number), reserve=reserve)
                if isinstance(piece, RowBlocks):
                    writer.add_blocks(entry.name, piece.shape, piece.dtype, piece.blocks())
                else:
                    writer.add(entry.name, piece)
                part_bytes += size
                group.append(entry)
                if entry.name.endswith("post_attention_layernorm.weight") or index == len(plan) - 1:
                    done = rank * len(plan) + index + 1
                    events("shard", "tensor", done / total,
                           f"rank {rank + 1}/{degree}: {index + 1}/{len(plan)} tensors written",
                           tensors_done=done, tensors_total=total)  # fmt: skip
            close(writer, rank, number, group, part_bytes)
        except BaseException:
            writer.abort()
            raise
    return report
