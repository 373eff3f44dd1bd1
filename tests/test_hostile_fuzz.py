"""Issue #28's acceptance fuzz: generated request bodies and model files find no 500, no hang and no
traceback in a reason.

Requests go through the real app (SigV4 signed, a real ``JobService`` over a store) in process;
model files through the same checks a job runs (``check_model_dir``, the streaming header parser,
archive extraction). Every example has a deadline, and the whole module stays well under a minute.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import struct
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from optjob.api.principals import Principal
from optjob.api.server import create_app
from optjob.errors import InputError
from optjob.jobs.service import JobService
from optjob.runtime.cancel import CancelToken
from optjob.settings import load_settings
from optjob.storage.archive import extract_tar_stream
from optjob.storage.inputs import check_model_dir
from optjob.storage.tensorstream.header import parse_header
from optjob.testing.local_s3 import write_tiny_model
from tests.support.jobs import request_wire

KEY, SECRET, ACCOUNT = "AKIAFUZZ000000000001", "fuzz/secret", "111111111111"
OPERATIONS = ["CreateOptimizationJob", "DescribeOptimizationJob", "ListOptimizationJobs", "StopOptimizationJob",
              "DeleteOptimizationJob"]  # fmt: skip
FAST = settings(max_examples=300, deadline=2000, suppress_health_check=list(HealthCheck), derandomize=True)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**30), 10**30) | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)


@st.composite
def request_bodies(draw: st.DrawFn) -> bytes:
    """Garbage, JSON of any shape, or a valid Create with one member replaced by anything."""
    kind = draw(st.sampled_from(["bytes", "json", "mutated", "deep", "bigint", "token"]))
    if kind == "token":  # a NextToken is base64 JSON: forge one from anything
        inner = draw(st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()))
        return json.dumps({"NextToken": base64.urlsafe_b64encode(inner).decode().rstrip("=")}).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "deep":
        depth = draw(st.integers(20, 5000))
        return b'{"OptimizationJobName": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == "bigint":
        return b'{"MaxResults": ' + b"9" * draw(st.integers(1, 6000)) + b"}"
    wire: dict[str, Any] = request_wire("fuzz-job", RoleArn=f"arn:aws:iam::{ACCOUNT}:role/r")
    path = draw(st.sampled_from([
        ("OptimizationJobName",), ("ModelSource", "S3", "S3Uri"), ("OutputConfig", "S3OutputLocation"),
        ("OutputConfig", "KmsKeyId"), ("StoppingCondition", "MaxRuntimeInSeconds"), ("OptimizationEnvironment",),
        ("OptimizationConfigs",), ("Tags",), ("DeploymentInstanceType",), ("CreationTimeAfter",),
    ]))  # fmt: skip
    node = wire
    for part in path[:-1]:
        node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
    node[path[-1]] = draw(json_values)
    return json.dumps(wire).encode()


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    settings_ = load_settings(home=tmp_path_factory.mktemp("fuzz-home"), region="us-east-1")
    service = JobService(settings_, start_executor=False)
    app = create_app(lambda: service, {KEY: Principal("fuzz", ACCOUNT, KEY, SECRET)})
    return TestClient(app, raise_server_exceptions=False)


@FAST
@given(body=request_bodies(), operation=st.sampled_from(OPERATIONS), region=st.sampled_from(
    ["us-east-1", "eu-west-1", "fake-region-1", "cn-north-1", "x" * 70]))  # fmt: skip
def test_no_request_body_makes_a_500(client: TestClient, body: bytes, operation: str, region: str) -> None:
    request = AWSRequest(method="POST", url="http://testserver/", data=body,
                         headers={"Content-Type": "application/x-amz-json-1.1",
                                  "X-Amz-Target": f"SageMaker.{operation}"})  # fmt: skip
    SigV4Auth(Credentials(KEY, SECRET), "sagemaker", region).add_auth(request)
    response = client.post("/", content=body, headers=dict(request.prepare().headers))
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()
        assert error["__type"] != "InternalFailure" and "Traceback" not in error["message"]
        assert len(response.content) < 16_384


# --- model files ---------------------------------------------------------------------------------

config_numbers = st.one_of(
    st.integers(-(10**15), 10**15), st.just(10**12), st.just(1_000_000), st.text(max_size=5), st.floats(),
    st.lists(st.integers(-5, 10**7), max_size=3), st.booleans(), st.none(),
)  # fmt: skip


@st.composite
def configs(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["fields", "json", "deep", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=100))
    if kind == "deep":
        depth = draw(st.integers(30, 20_000))
        return b'{"model_type": "llama", "x": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    fields = draw(st.dictionaries(st.sampled_from(
        ["num_hidden_layers", "vocab_size", "hidden_size", "num_attention_heads", "intermediate_size"]),
        config_numbers, max_size=4))  # fmt: skip
    nested = draw(st.booleans())
    return json.dumps({"model_type": "llama", **({"text_config": fields} if nested else fields)}).encode()


@st.composite
def headers(draw: st.DrawFn) -> bytes:
    """A safetensors file: a header of any content and any declared length, then a few bytes."""
    kind = draw(st.sampled_from(["entries", "json", "deep", "bytes"]))
    if kind == "deep":
        depth = draw(st.integers(30, 20_000))
        body = b'{"__metadata__": ' + b"[" * depth + b"]" * depth + b"}"
    elif kind == "bytes":
        body = draw(st.binary(max_size=100))
    elif kind == "json":
        body = json.dumps(draw(json_values)).encode()
    else:
        entry = st.fixed_dictionaries(
            {
                "dtype": st.sampled_from(["F32", "BF16", "XX"]) | json_values,
                "shape": st.lists(st.integers(-3, 10**6), max_size=3) | json_values,
                "data_offsets": st.lists(st.integers(-5, 10**9), max_size=3) | json_values,
            }
        )
        body = json.dumps(draw(st.dictionaries(st.text(max_size=8), entry, max_size=3))).encode()
    declared = draw(st.sampled_from([len(body), len(body) + 1, 2**63, 0]))
    return struct.pack("<Q", declared) + body + draw(st.binary(max_size=16))


def _only_input_errors(call: Any) -> None:
    try:
        call()
    except InputError as exc:
        reason = str(exc)
        assert "Traceback" not in reason and "this is a bug" not in reason.lower(), reason
        assert len(reason) < 4_096


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("fuzz-model") / "model")


@FAST
@given(config=configs(), shard=headers())
def test_no_config_or_header_is_anything_but_an_input_error(tiny_model: Path, config: bytes, shard: bytes) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        model = Path(shutil.copytree(tiny_model, Path(scratch) / "model"))
        (model / "config.json").write_bytes(config)
        _only_input_errors(lambda: check_model_dir(model))
        (model / "config.json").write_bytes(b'{"model_type": "llama"}')
        (model / "model-00001-of-00002.safetensors").write_bytes(shard)
        _only_input_errors(lambda: check_model_dir(model))
    _only_input_errors(lambda: parse_header(shard, what="s3://b/model.safetensors", file_bytes=len(shard)))


class _Object(io.RawIOBase):
    """An archive's bytes with the two attributes extraction reads from its S3 reader."""

    def __init__(self, data: bytes) -> None:
        self._data, self.uri, self.size = io.BytesIO(data), "s3://b/model.tar.gz", len(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        return self._data.readinto(buffer)


member_names = st.sampled_from(["config.json", "a/../b.json", "/etc/x", "ok.safetensors", "x.py", "d/", "", "a\\b",
                                "tok/vocab.txt", "tok", "big.bin"]) | st.text(max_size=12)  # fmt: skip


@st.composite
def archives(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as archive:
        for name, kind, data in draw(st.lists(st.tuples(member_names, st.sampled_from(
                [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE]),
                st.binary(max_size=64)), max_size=6)):  # fmt: skip
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "config.json" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            archive.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    raw = buffer.getvalue()
    cut = draw(st.sampled_from([len(raw), len(raw) // 2, len(raw) - 1]))
    return raw[:cut]


@FAST
@given(data=archives())
def test_no_archive_is_anything_but_an_input_error(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        dest = Path(scratch) / "x"
        dest.mkdir()
        _only_input_errors(lambda: extract_tar_stream(_Object(data), dest, CancelToken(), dropped=[]))  # type: ignore[arg-type]
        outside = [p for p in Path(scratch).rglob("*") if not p.is_relative_to(dest)]
        assert outside == [], outside
