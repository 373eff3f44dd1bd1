"""Tensor-by-tensor safetensors I/O: what it writes is what the safetensors library reads, and back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from optjob.storage.safetensors_io import ShardReader, ShardWriter, header_reserve


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {
        "model.embed_tokens.weight": torch.randn(64, 32, generator=gen).to(torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(48, 32, generator=gen).to(torch.float8_e4m3fn),
        "model.layers.0.mlp.up_proj.weight_scale": torch.rand(48, 1, generator=gen).to(torch.bfloat16),
        "model.norm.weight": torch.randn(32, generator=gen),
        "model.rotary.inv_freq": torch.randn(16, generator=gen).double(),
        "packed": torch.randint(-(2**31), 2**31 - 1, (5, 3), dtype=torch.int32, generator=gen),
        "mask": torch.rand(7, generator=gen) > 0.5,
        "scalar": torch.tensor(2.5, dtype=torch.float16),
        "empty": torch.empty(0, 4, dtype=torch.bfloat16),
    }


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.numel() else t


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit (NaNs and fp8 included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bytes(a), _bytes(b))


def test_reads_what_the_library_wrote(tmp_path: Path) -> None:
    tensors = _tensors()
    path = tmp_path / "lib.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    with ShardReader(path) as reader:
        assert set(reader.names()) == set(tensors)
        assert reader.metadata == {"format": "pt"}
        for name, tensor in tensors.items():
            assert _same(reader.read(name), tensor), name


@pytest.mark.parametrize("reserve", ["enough", "too small"])
def test_the_library_reads_what_we_wrote(tmp_path: Path, reserve: str) -> None:
    tensors = _tensors()
    source = tmp_path / "in.safetensors"
    save_file(tensors, str(source))
    out = tmp_path / "out.safetensors"
    size = header_reserve(list(tensors)) if reserve == "enough" else 16  # "too small": the rewrite path
    writer = ShardWriter(out, reserve=size)
    with ShardReader(source) as reader:
        for i, name in enumerate(reader.names()):
            if i % 2:
                writer.add(name, reader.read(name))
            else:
                reader.copy_to(name, writer)
    assert not out.exists()  # nothing under the final name before close
    writer.close(metadata={"format": "pt"})
    assert not out.with_name(out.name + ".partial").exists()
    loaded = load_file(str(out))
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert _same(loaded[name], tensor), name
    with safe_open(str(out), "pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    assert writer.bytes_written == sum(t.numel() * t.element_size() for t in tensors.values())


def test_abort_leaves_nothing_and_bad_input_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    writer = ShardWriter(out, reserve=header_reserve(["a"]))
    writer.add("a", torch.ones(3))
    with pytest.raises(ValueError, match="written twice"):
        writer.add("a", torch.ones(3))
    with pytest.raises(ValueError, match="cannot be stored"):
        writer.add("c", torch.ones(2, dtype=torch.complex64))
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_a_truncated_shard_is_named(tmp_path: Path) -> None:
    path = tmp_path / "cut.safetensors"
    save_file({"w": torch.ones(1024)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with ShardReader(path) as reader, pytest.raises(ValueError, match="cut.safetensors: tensor w is cut short"):
        reader.read("w")


def test_row_ranges_read_only_those_rows(tmp_path: Path) -> None:
    tensors = _tensors()
    path = tmp_path / "rows.safetensors"
    save_file(tensors, str(path))
    with ShardReader(path) as reader:
        for name in ("model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.norm.weight", "mask"):
            whole = tensors[name]
            for start, stop in [(0, 1), (3, 17), (10, 10), (5, 10_000), (0, whole.shape[0])]:
                assert _same(reader.read_rows(name, start, stop), whole[start:stop]), (name, start, stop)
        with pytest.raises(ValueError, match="scalar"):
            reader.read_rows("scalar", 0, 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int8])
def test_column_ranges_match_slicing(tmp_path: Path, dtype: torch.dtype) -> None:
    tensor = (torch.randn(37, 24) * 10).to(dtype)
    save_file({"a": torch.zeros(3), "w": tensor}, str(tmp_path / "m.safetensors"))
    with ShardReader(tmp_path / "m.safetensors") as reader:
        for start, stop in [(0, 6), (6, 12), (18, 24), (0, 24), (5, 5)]:
            got = reader.read_columns("w", start, stop)
            assert got.dtype == dtype and torch.equal(got, tensor[:, start:stop])
        with pytest.raises(ValueError, match="outside its 24 columns"):
            reader.read_columns("w", 20, 30)
