"""Issue #28 in a model directory: files a caller uploads are bounded and refused by name, never "a bug".

Each test builds a real model directory (``write_tiny_model``: config.json, two safetensors shards
and their index), breaks one thing the way a hostile or careless upload would, and checks what
the job would say (the InputError's text is the job's FailureReason).
"""

from __future__ import annotations

import json
import shutil
import struct
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from optjob.errors import InputError
from optjob.jobs.outcomes import reason_problems
from optjob.pipeline.stream_source import weight_order
from optjob.storage.inputs import check_model_dir, read_config
from optjob.storage.tensorstream.header import parse_header
from optjob.testing.local_s3 import write_tiny_model


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_tiny_model(tmp_path / "model")


def _edit_config(model: Path, **changes: object) -> None:
    config = json.loads((model / "config.json").read_text())
    config.update(changes)
    (model / "config.json").write_text(json.dumps(config))


def _refused(model: Path, *needles: str) -> str:
    with pytest.raises(InputError) as caught:
        check_model_dir(model)
    reason = str(caught.value)
    for needle in needles:
        assert needle in reason, reason
    assert "bug" not in reason and "Traceback" not in reason
    return reason


# --- item 6: nesting and giant numbers are the input's fault ----------------------------------------


def test_a_deeply_nested_config_is_refused_naming_config_json(model: Path) -> None:
    (model / "config.json").write_text('{"model_type": "llama", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    _refused(model, "config.json nests JSON deeper than 32 levels")
    (model / "config.json").write_text('{"model_type": "llama", "x": ' + "[" * 40 + "]" * 40 + "}")
    _refused(model, "config.json nests JSON deeper than 32 levels")


def test_a_config_integer_of_thousands_of_digits_is_refused(model: Path) -> None:
    (model / "config.json").write_text('{"model_type": "llama", "hidden_size": ' + "9" * 5000 + "}")
    _refused(model, "config.json is not valid JSON (an integer has more than 4300 digits)")


def _write_header(path: Path, header: bytes) -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header)


def test_a_deeply_nested_safetensors_header_is_refused_naming_the_file(model: Path) -> None:
    shard = model / "model-00001-of-00002.safetensors"
    _write_header(shard, b'{"__metadata__": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    _refused(model, "The safetensors header of model-00001-of-00002.safetensors nests JSON deeper than")
    raw = struct.pack("<Q", 2 * 50_000 + 2) + b"{" + b"[" * 50_000 + b"]" * 50_000 + b"}"
    with pytest.raises(InputError, match="nests JSON deeper than|not valid JSON"):
        parse_header(raw, what="s3://models/tiny/model.safetensors", file_bytes=len(raw))


@pytest.mark.parametrize(
    "header",
    [
        {"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}},
        {"w": "not an entry"},
        {"__metadata__": ["not", "a", "map"], "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
    ],
)
def test_malformed_header_entries_are_input_errors(header: dict) -> None:
    body = json.dumps(header).encode()
    raw = struct.pack("<Q", len(body)) + body + b"\0" * 4
    with pytest.raises(InputError):
        parse_header(raw, what="s3://models/tiny/model.safetensors", file_bytes=len(raw))


# --- item 1: config numbers in range and in agreement with the weights ------------------------------


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("num_hidden_layers", 1_000_000, "config.json num_hidden_layers is 1000000, outside the plausible range"),
        ("vocab_size", 10**12, "config.json vocab_size is 1000000000000, outside the plausible range 1..4194304"),
        ("hidden_size", -5, "config.json hidden_size is -5, outside the plausible range"),
        ("num_hidden_layers", "many", "config.json num_hidden_layers is 'many', not an integer"),
    ],
)
def test_config_numbers_outside_plausible_ranges_are_refused_before_any_tensor(
    model: Path, field: str, value: object, says: str
) -> None:
    _edit_config(model, **{field: value})
    with pytest.raises(InputError) as caught:
        read_config(model / "config.json")  # what the streaming paths call as soon as config.json lands
    assert says in str(caught.value) and reason_problems(str(caught.value)) == []
    _refused(model, says)


def test_a_nested_text_config_is_checked_too(model: Path) -> None:
    _edit_config(model, text_config={"num_hidden_layers": 10**7})
    _refused(model, "config.json text_config.num_hidden_layers is 10000000")


def test_a_config_claiming_more_layers_than_the_weights_hold_is_refused_with_both_numbers(model: Path) -> None:
    _edit_config(model, num_hidden_layers=900)  # in range, but the weights hold two layers
    reason = _refused(model, "num_hidden_layers is 900 but the safetensors weights hold 2 layers")
    assert reason_problems(reason) == []
    _edit_config(model, num_hidden_layers=2)
    assert check_model_dir(model).tensor_count == 4


# --- item 8: a pickle-only model says it was refused as unsafe --------------------------------------


def test_a_pickle_only_model_is_refused_as_unsafe_pickle(model: Path) -> None:
    for shard in model.glob("*.safetensors"):
        shard.unlink()
    (model / "model.safetensors.index.json").unlink()
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    _refused(model, "pickle weights (pytorch_model.bin)", "refused as unsafe")


def test_a_streamed_pickle_only_source_is_refused_as_unsafe_not_as_weightless() -> None:
    listing = SimpleNamespace(uri="s3://models/tiny/", remotes={"config.json": 1, "pytorch_model.bin": 2})
    with pytest.raises(InputError) as caught:
        weight_order(listing)
    assert "holds only pickle weights (pytorch_model.bin), which are refused as unsafe" in str(caught.value)


# --- the same refusals from a real job, whichever path it takes --------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from optjob.testing import build_tiny_llama

    return build_tiny_llama(
        tmp_path_factory.mktemp("tiny") / "model",
        hidden=64, intermediate=128, layers=2, heads=2, kv_heads=1, vocab=256, shards=2, train_steps=0,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("scheme", "granularity"), [("FP8_DYNAMIC", "tensor"), ("FP8_DYNAMIC", "file"), ("FP8", "whole model")]
)
@pytest.mark.parametrize(
    ("edit", "says"),
    [
        ({"num_hidden_layers": 1_000_000}, "config.json num_hidden_layers is 1000000, outside the plausible range"),
        ({"vocab_size": 10**12}, "config.json vocab_size is 1000000000000, outside the plausible range"),
        ({"x": "DEEP"}, "config.json nests JSON deeper than 32 levels"),
        ({"num_hidden_layers": 1000}, "num_hidden_layers is 1000 but the safetensors weights hold 2 layers"),
    ],
)
def test_a_job_on_a_hostile_config_fails_at_once_naming_config_json(
    s3_bucket, llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scheme: str, granularity: str,
    edit: dict, says: str,
) -> None:  # fmt: skip
    from optjob.api.errors import parse
    from optjob.api.shapes import CreateOptimizationJobRequest
    from optjob.pipeline.plan import build_plan
    from optjob.pipeline.run import run_plan
    from tests.support.stages import fp8_job_request

    monkeypatch.setenv("OPTJOB_STREAM_GRANULARITY", "file" if granularity == "file" else "tensor")
    model = Path(shutil.copytree(llama, tmp_path / "model"))
    config = json.loads((model / "config.json").read_text())
    text = json.dumps({**config, **edit}).replace('"DEEP"', "[" * 5000 + "]" * 5000)
    (model / "config.json").write_text(text)
    s3_bucket.upload_dir(model, "m")
    request = parse(
        CreateOptimizationJobRequest, fp8_job_request("hostile", s3_bucket.uri("m/"), s3_bucket.uri("o/"), scheme)
    )
    started = time.monotonic()
    with pytest.raises(InputError) as caught:
        run_plan(build_plan(request, region="us-east-1"), work_dir=tmp_path / "work",
                 job_arn="arn:aws:sagemaker:us-east-1:000000000000:optimization-job/hostile")  # fmt: skip
    assert says in str(caught.value) and reason_problems(str(caught.value)) == []
    assert time.monotonic() - started < 60
    assert s3_bucket.keys("o/") == []
