"""The sharding gate: every rank file is read back and matched to the source, bit for bit, before upload.

vLLM loads a wrong layout without complaint, so nothing may leave the host on trust. The gate has
its own description of the layout, written apart from the splitter: for each tensor and rank, the
source regions (rows, columns, or zero padding) that the rank's piece must hold (``regions``). Two
checks follow from it:

* once per tensor, from shapes alone: the regions of all ranks put the source back together —
  every row (or column) of every source tensor covered exactly once, or, for KV heads the degree
  replicates, by every rank of its group (``check_tiling``);
* for each rank file as soon as it is closed (still in the page cache): every piece is read back
  from disk and compared with its regions of the source, and padding rows must be zero, buffers
  vLLM's defaults (``check_file``).

Together they are a reassembly of each rank back into the source tensors, done rank by rank so
that no rank's file waits for the others, and none is uploaded unchecked.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from optjob.errors import VerificationFailed
from optjob.storage.safetensors_io import ShardReader
from optjob.techniques.shard.layout import Entry, Geometry, block_rows, same_bits
from optjob.techniques.shard.writer import SourceTensors

_DEFECT = (
    "nothing was published. The source is fine; this is a defect in optjob's sharder: report it with the job "
    "log, and serve the unsharded model meanwhile"
)


@dataclass(frozen=True)
class Region:
    """Rows ``out`` of a rank's piece hold ``rows`` x ``cols`` of ``source`` (None: zero padding)."""

    out: tuple[int, int]
    source: str | None = None
    rows: tuple[int, int] | None = None  # None: all rows
    cols: tuple[int, int] | None = None  # None: all columns


@dataclass
class GateFigures:
    files_checked: int = 0
    tensors_checked: int = 0
    bytes_read_back: int = 0
    seconds: float = 0.0


def _block(total: int, parts: int, index: int) -> tuple[int, int]:
    size = total // parts
    return index * size, (index + 1) * size


def regions(geo: Geometry, degree: int, entry: Entry, rank: int, shapes: dict[str, list[int]]) -> list[Region]:
    """Where each row block of ``rank``'s piece of ``entry`` comes from in the source."""
    if entry.split == "replicate":
        return [Region((0, shapes[entry.sources[0]][0]), entry.sources[0])]
    if entry.split == "columns":
        name = entry.sources[0]
        return [Region((0, shapes[name][0]), name, cols=_block(shapes[name][1], degree, rank))]
    if entry.split == "vocab":
        per = geo.padded_vocab // degree
        first, last = rank * per, min((rank + 1) * per, geo.vocab)
        real = max(0, last - first)
        out = [Region((0, real), entry.sources[0], rows=(first, first + real))] if real else []
        return out + ([Region((real, per))] if real < per else [])
    if entry.split == "merged":
        out, at = [], 0
        for name in entry.sources:
            start, stop = _block(shapes[name][0], degree, rank)
            out.append(Region((at, at + stop - start), name, rows=(start, stop)))
            at += stop - start
        return out
    if entry.split == "qkv":
        q, k, v = entry.sources
        q_start, q_stop = _block(geo.heads * geo.head_dim, degree, rank)
        if geo.kv_heads >= degree:
            kv_start, kv_stop = _block(geo.kv_heads * geo.head_dim, degree, rank)
        else:  # ranks are grouped evenly over the KV heads; each group holds its head whole
            head = rank * geo.kv_heads // degree
            kv_start, kv_stop = head * geo.head_dim, (head + 1) * geo.head_dim
        n_q, n_kv = q_stop - q_start, kv_stop - kv_start
        return [
            Region((0, n_q), q, rows=(q_start, q_stop)),
            Region((n_q, n_q + n_kv), k, rows=(kv_start, kv_stop)),
            Region((n_q + n_kv, n_q + 2 * n_kv), v, rows=(kv_start, kv_stop)),
        ]
    raise ValueError(f"{entry.name}: no regions for split {entry.split}")


def check_tiling(geo: Geometry, degree: int, entry: Entry, shapes: dict[str, list[int]]) -> None:
    """The ranks' regions put every source tensor of ``entry`` back together exactly (shapes only)."""
    if entry.split == "buffer":
        return
    covered: dict[str, Counter[tuple[int, int]]] = {name: Counter() for name in entry.sources}
    for rank in range(degree):
        for region in regions(geo, degree, entry, rank, shapes):
            if region.source is not None:
                span = region.cols if region.cols is not None else region.rows or (0, shapes[region.source][0])
                covered[region.source][span] += 1  # how many ranks hold this span
    for name, spans in covered.items():
        axis = 1 if entry.split == "columns" else 0
        length, unit = shapes[name][axis], ("rows", "columns")[axis]
        at = 0
        for a, b in sorted(spans):  # distinct spans must tile [0, length) without gaps or overlaps
            if a != at or b <= a:
                raise VerificationFailed(
                    f"sharding gate: the ranks' pieces of {entry.name} do not put {name} back together "
                    f"({unit} {at}..{a} missing or overlapping); {_DEFECT}"
                )
            at = b
        if at != length:
            raise VerificationFailed(
                f"sharding gate: {entry.name} covers {at} of the {length} {unit} of {name}; {_DEFECT}"
            )
        if entry.split == "vocab":  # ranks past the vocabulary hold only padding
            continue
        if any(count != degree // len(spans) for count in spans.values()):
            raise VerificationFailed(
                f"sharding gate: {name} is not spread evenly over the {degree} ranks in {entry.name}; {_DEFECT}"
            )


def check_file(
    path: Path,
    rank: int,
    entries: list[Entry],
    geo: Geometry,
    degree: int,
    source: SourceTensors,
    figures: GateFigures,
) -> None:
    """Raise VerificationFailed unless rank ``rank``'s file holds exactly its regions of the source."""
    with ShardReader(path) as reader:
        names = [entry.name for entry in entries]
        if reader.names() != names:
            raise VerificationFailed(
                f"sharding gate: {path.name} holds {len(reader.names())} tensors where rank {rank} should hold "
                f"{len(names)} in vLLM's order; {_DEFECT}"
            )
        for entry in entries:
            figures.tensors_checked += 1
            if entry.split == "buffer":
                piece = reader.read(entry.name)
                if piece.dtype != torch.float32 or piece.shape != () or piece.item() != 1.0:
                    raise VerificationFailed(f"sharding gate: {entry.name} is not vLLM's default scale; {_DEFECT}")
                continue
            shapes = {name: source.shape(name) for name in entry.sources}
            if rank == 0:
                check_tiling(geo, degree, entry, shapes)
            parts = regions(geo, degree, entry, rank, shapes)
            rows = reader.shape(entry.name)[0]
            if rows != parts[-1].out[1]:
                raise VerificationFailed(
                    f"sharding gate: {entry.name} on rank {rank} has {rows} rows, its regions of the "
                    f"source have {parts[-1].out[1]}; {_DEFECT}"
                )
            for region in parts:
                for got, expected in _blocks(reader, entry.name, region, source, geo):
                    figures.bytes_read_back += got.numel() * got.element_size()
                    if expected is None:
                        if got.count_nonzero():
                            raise VerificationFailed(
                                f"sharding gate: {entry.name} on rank {rank} has non-zero padding rows; {_DEFECT}"
                            )
                    elif not same_bits(got, expected):
                        raise VerificationFailed(
                            f"sharding gate: {entry.name} on rank {rank} does not hold {region.source} "
                            f"rows {region.rows or 'all'} columns {region.cols or 'all'} bit for bit; {_DEFECT}"
                        )
    figures.files_checked += 1


def _blocks(
    reader: ShardReader, name: str, region: Region, source: SourceTensors, geo: Geometry
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """(what the file holds, what the source says) for a region, in row blocks where the region is
    made of source rows (the vocabulary pieces are the largest tensors; never hold one whole)."""
    first, last = region.out
    if region.source is not None and region.cols is not None:  # a column block: whole rows needed
        yield reader.read_rows(name, first, last), source.columns(region.source, *region.cols).to(geo.torch_dtype)
        return
    width = int(math.prod(reader.shape(name)[1:]) or 1)
    step = block_rows(width, geo.torch_dtype)
    offset = region.rows[0] - first if region.rows is not None else -first
    for start in range(first, last, step):
        stop = min(start + step, last)
        got = reader.read_rows(name, start, stop)
        if region.source is None:
            yield got, None
        else:
            yield got, source.rows(region.source, start + offset, stop + offset).to(geo.torch_dtype)
