"""The sharding gate: every closed part is read back and put together again, bit for bit.

vLLM loads a wrong layout without complaint, so no manifest may be written on trust. For each
part, as soon as every rank's file is closed, each tensor is read back from the files themselves, the
ranks' pieces are reassembled into the source tensors with ``layout.reassemble`` (written apart
from the splitter, so a slip in either shows), and compared with the source tensor's bytes (in the
output dtype). Vocabulary tensors are checked a rank at a time, so the gate never holds more than
the largest source tensor plus one rank's piece of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from optjob.errors import VerificationFailed
from optjob.storage.safetensors_io import ShardReader
from optjob.techniques.shard.layout import Entry, Geometry, reassemble, same_bits
from optjob.techniques.shard.writer import Part, SourceTensors

_DEFECT = (
    "nothing was published. The source is fine; this is a defect in optjob's sharder: report it with the job "
    "log, and serve the unsharded model meanwhile"
)


@dataclass
class GateFigures:
    tensors_checked: int = 0
    source_tensors_matched: int = 0
    bytes_read_back: int = 0


def check_part(part: Part, geo: Geometry, degree: int, source: SourceTensors, figures: GateFigures) -> None:
    """Raise VerificationFailed unless ``part``'s files reassemble into the source exactly."""
    readers = [ShardReader(path) for path in part.paths]
    try:
        names = [entry.name for entry in part.entries]
        for rank, reader in enumerate(readers):
            if reader.names() != names:
                raise VerificationFailed(
                    f"sharding gate: {reader.path.name} holds {len(reader.names())} tensors where rank {rank} "
                    f"should hold {len(names)} in vLLM's order; {_DEFECT}"
                )
        for entry in part.entries:
            if entry.split == "vocab":
                _check_vocab(entry, geo, degree, readers, source)
                matched = 1
            else:
                pieces = [reader.read(entry.name) for reader in readers]
                try:
                    rebuilt = reassemble(geo, degree, entry, pieces)
                except ValueError as exc:
                    raise VerificationFailed(f"sharding gate: {exc}; {_DEFECT}") from None
                for name, tensor in rebuilt.items():
                    _compare(entry, name, tensor, source.whole(name).to(geo.torch_dtype))
                matched = len(rebuilt)
            figures.tensors_checked += 1
            figures.source_tensors_matched += matched
        figures.bytes_read_back += part.bytes_per_rank * degree
    finally:
        for reader in readers:
            reader.close()


def _check_vocab(entry: Entry, geo: Geometry, degree: int, readers: list[ShardReader], source: SourceTensors) -> None:
    per = geo.padded_vocab // degree
    for rank, reader in enumerate(readers):
        piece = reader.read(entry.name)
        if list(piece.shape) != [per, geo.hidden]:
            raise VerificationFailed(
                f"sharding gate: {entry.name} on rank {rank} has shape {list(piece.shape)}, vLLM expects "
                f"[{per}, {geo.hidden}] ({geo.vocab} rows padded to {geo.padded_vocab}, split {degree} ways); {_DEFECT}"
            )
        first = rank * per
        real = max(0, min(per, geo.vocab - first))
        if real:
            expected = source.rows(entry.sources[0], first, first + real).to(geo.torch_dtype)
            _compare(entry, f"{entry.sources[0]} rows {first}:{first + real}", piece[:real], expected)
        if piece[real:].count_nonzero():
            raise VerificationFailed(
                f"sharding gate: {entry.name} on rank {rank} has non-zero vocabulary padding rows; {_DEFECT}"
            )


def _compare(entry: Entry, what: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    if not same_bits(got, expected):
        raise VerificationFailed(
            f"sharding gate: {entry.name} does not reassemble to the source {what} bit for bit "
            f"(got {got.dtype} {list(got.shape)}, source {expected.dtype} {list(expected.shape)}); {_DEFECT}"
        )
