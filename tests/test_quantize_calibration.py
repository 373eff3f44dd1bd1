"""Calibration data: built-in corpus and user JSONL in plain, ShareGPT and OpenAI chat shapes."""

from __future__ import annotations

import json

import pytest

from optjob.errors import InputError
from optjob.techniques.quantize.calibration import (
    LocalCalibrationSource,
    StorageCalibrationSource,
    builtin_path,
    load_texts,
    source_for,
)


def test_builtin_corpus_is_shipped_small_and_non_empty():
    assert builtin_path().stat().st_size < 300_000
    texts = load_texts(None)
    assert len(texts) > 500 and all(t.strip() for t in texts)
    assert load_texts("builtin") == texts


def test_three_jsonl_shapes(tmp_path):
    rows = [
        {"text": "plain text sample"},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"messages": [{"role": "user", "content": "question"}, {"role": "assistant", "content": "answer"}]},
        {"text": ""},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "parts"}]}]},
    ]
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    texts = load_texts(str(path))
    assert texts == ["plain text sample", "hi\nhello", "question\nanswer", "parts"]
    assert load_texts(f"file://{path}") == texts
    assert load_texts(str(tmp_path)) == texts  # a directory of *.jsonl


def test_bad_inputs_are_input_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(InputError, match="line 2"):
        load_texts(str(bad))
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n')
    with pytest.raises(InputError, match="no usable calibration text"):
        load_texts(str(empty))
    with pytest.raises(InputError, match="no such"):
        load_texts(str(tmp_path / "missing.jsonl"))
    with pytest.raises(InputError, match="no storage client"):
        load_texts("s3://bucket/calib.jsonl")


def test_s3_uri_goes_through_the_storage_client():
    class FakeStorage:
        def read_text(self, uri):
            assert uri == "s3://b/k.jsonl"
            return '{"text": "from s3"}\n'

    assert isinstance(source_for("s3://b/k.jsonl", FakeStorage()), StorageCalibrationSource)
    assert isinstance(source_for("/x.jsonl"), LocalCalibrationSource)
    assert load_texts("s3://b/k.jsonl", storage=FakeStorage()) == ["from s3"]


def test_an_s3_calibration_prefix_is_read_with_the_jobs_own_s3_settings(s3_bucket):
    """What a job passes its stages (its S3 settings, role credentials included) reads a real bucket."""
    from optjob.storage.s3 import S3Settings

    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="calib/a.jsonl", Body=b'{"text": "first"}\n')
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="calib/b.jsonl", Body=b'{"text": "second"}\n')
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="calib/notes.txt", Body=b"not calibration")
    assert load_texts(s3_bucket.uri("calib/"), storage=S3Settings()) == ["first", "second"]
    assert load_texts(s3_bucket.uri("calib/b.jsonl"), storage=S3Settings()) == ["second"]
    with pytest.raises(InputError, match="missing.jsonl"):
        load_texts(s3_bucket.uri("calib/missing.jsonl"), storage=S3Settings())
