"""check_model_dir: each way a model directory can be unsafe or incomplete has its own message."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch

from optjob.errors import InputError
from optjob.storage.inputs import check_model_dir, load_pickle_weights, safe_relative_path
from tests.support.s3server import write_tiny_model


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_tiny_model(tmp_path / "model")


def test_good_model_is_described(model: Path) -> None:
    report = check_model_dir(model)
    assert report.model_type == "llama"
    assert report.has_index
    assert report.safetensors_files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert report.tensor_count == 4
    assert report.total_bytes == sum(p.stat().st_size for p in model.iterdir())
    assert not report.custom_code


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        check_model_dir(tmp_path / "nope")


def test_missing_config(model: Path) -> None:
    (model / "config.json").unlink()
    with pytest.raises(InputError, match="no config.json.*S3Uri"):
        check_model_dir(model)


def test_invalid_config(model: Path) -> None:
    (model / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="config.json is not valid JSON"):
        check_model_dir(model)


def test_missing_shard(model: Path) -> None:
    (model / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(InputError, match="names shard model-00002-of-00002.safetensors, which is missing"):
        check_model_dir(model)


def test_index_names_tensor_absent_from_shard(model: Path) -> None:
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "model-00001-of-00002.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match="'lm_head.weight' in model-00001-of-00002.safetensors, whose header"):
        check_model_dir(model)


def test_truncated_shard(model: Path) -> None:
    shard = model / "model-00001-of-00002.safetensors"
    os.truncate(shard, shard.stat().st_size - 10)
    with pytest.raises(InputError, match="model-00001-of-00002.safetensors: the header describes .* Re-upload"):
        check_model_dir(model)


def test_header_longer_than_file(model: Path) -> None:
    (model / "model-00001-of-00002.safetensors").write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(InputError, match="declares a 10000-byte header but the file is 10 bytes"):
        check_model_dir(model)


def test_tensor_size_disagrees_with_shape(model: Path) -> None:
    header = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}
    raw = json.dumps(header).encode()
    (model / "model-00001-of-00002.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    with pytest.raises(InputError, match=r"tensor 'w' \(F32, shape \[4\]\) needs 16 bytes"):
        check_model_dir(model)


def test_no_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InputError, match="no weights"):
        check_model_dir(tmp_path)


def test_symlink_refused(model: Path, tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("x")
    (model / "tokenizer.json").symlink_to(tmp_path / "secret")
    with pytest.raises(InputError, match="tokenizer.json is a symbolic link"):
        check_model_dir(model)


def test_hard_link_refused(model: Path, tmp_path: Path) -> None:
    (tmp_path / "outside").write_text("x")
    os.link(tmp_path / "outside", model / "vocab.txt")
    with pytest.raises(InputError, match="vocab.txt is a hard link"):
        check_model_dir(model)


def test_fifo_refused(model: Path) -> None:
    os.mkfifo(model / "pipe")
    with pytest.raises(InputError, match="pipe is a device, FIFO or socket"):
        check_model_dir(model)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "weights.pt", "model.pth"])
def test_pickle_weights_refused_by_default(model: Path, name: str) -> None:
    torch.save({"w": torch.ones(2)}, model / name)
    with pytest.raises(InputError, match=rf"pickle weights \({name}\).*arbitrary code.*safetensors"):
        check_model_dir(model)
    assert check_model_dir(model, allow_pickle=True).pickle_files == [name]


def test_allowed_pickle_loads_with_weights_only(tmp_path: Path) -> None:
    torch.save({"w": torch.arange(3)}, tmp_path / "ok.bin")
    assert torch.equal(load_pickle_weights(tmp_path / "ok.bin")["w"], torch.arange(3))

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("pwned",))

    torch.save({"w": Payload()}, tmp_path / "evil.bin", _use_new_zipfile_serialization=True)
    with pytest.raises(InputError, match="evil.bin could not be loaded as plain tensors with weights_only=True"):
        load_pickle_weights(tmp_path / "evil.bin")


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("../etc/passwd", r"'\.\.'"),
        ("a/../../b", r"'\.\.'"),
        ("/etc/passwd", "absolute path"),
        ("C:/x", "absolute path"),
        ("a\\b", "backslash"),
        ("a//b", "empty path segment"),
        ("", "empty"),
    ],
)
def test_unsafe_relative_paths(name: str, why: str) -> None:
    with pytest.raises(InputError, match=why):
        safe_relative_path(name, what="Archive member")


def test_safe_relative_path_normalises_dot_segments() -> None:
    assert safe_relative_path("./model/./config.json", what="x").as_posix() == "model/config.json"
