"""Tensor-granular streaming against the real S3 server and the safetensors library, both directions.

The reader must hand over exactly what ``safetensors`` reads from the same object (every dtype,
empty and scalar tensors, tensors straddling read-ahead chunks, a JSON header whose key order is not
the data order), hash the object on the way and spool an identical local copy; the planned writer
plus multipart upload must produce objects ``safetensors`` loads, in several parts; a cancelled
upload must leave no object and no open multipart upload.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load, save

from optjob.errors import InputError, JobCancelled, JobFailed
from optjob.runtime.cancel import CancelToken
from optjob.runtime.phases import PhaseClock
from optjob.storage.safetensors_io import TORCH_TO_ST
from optjob.storage.source import RemoteFile
from optjob.storage.tensorstream.header import build_header, parse_header
from optjob.storage.tensorstream.multipart import MultipartObjectWriter, UploadWindow
from optjob.storage.tensorstream.reader import ReadAhead, RemoteShard
from optjob.storage.tensorstream.writer import PlannedShardWriter
from tests.support.s3server import S3Bucket

MiB = 1 << 20


def _every_dtype() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    big = torch.randn(300, 257, generator=gen)  # 308 400 bytes: straddles several 64 KiB chunks
    return {
        "a.f32": big,
        "b.bf16": torch.randn(33, 7, generator=gen).to(torch.bfloat16),
        "c.f16": torch.randn(5, generator=gen).to(torch.float16),
        "d.f64": torch.randn(3, 3, generator=gen, dtype=torch.float64),
        "e.fp8": torch.randn(64, 3, generator=gen).to(torch.float8_e4m3fn),
        "f.i64": torch.arange(11, dtype=torch.int64),
        "g.i32": torch.arange(-5, 5, dtype=torch.int32),
        "h.i8": torch.arange(-8, 8, dtype=torch.int8),
        "i.u8": torch.arange(0, 200, dtype=torch.uint8),
        "j.bool": torch.tensor([True, False, True]),
        "k.empty": torch.empty(0, 4),
        "l.scalar": torch.tensor(3.5),
        "m.f8e5m2": torch.randn(9, generator=gen).to(torch.float8_e5m2),
    }


def _reorder_header(data: bytes) -> bytes:
    """The same file with the JSON keys listed in reverse data order (the format allows any order)."""
    (length,) = struct.unpack("<Q", data[:8])
    table = json.loads(data[8 : 8 + length])
    meta = table.pop("__metadata__", None)
    ordered = dict(sorted(table.items(), key=lambda item: -item[1]["data_offsets"][0]))
    if meta:
        ordered["__metadata__"] = meta
    body = json.dumps(ordered, separators=(",", ":")).encode()
    body += b" " * (length - len(body))  # same length, so the data offsets still hold
    assert len(body) == length
    return data[:8] + body + data[8 + length :]


def _remote(bucket: S3Bucket, key: str) -> RemoteFile:
    head = bucket.client.head_object(Bucket=bucket.name, Key=key)
    return RemoteFile(key, key.rsplit("/", 1)[-1], int(head["ContentLength"]), head["ETag"], None)


@pytest.mark.parametrize("reorder", [False, True], ids=["data-order", "header-order-differs"])
def test_reader_hands_over_what_safetensors_reads(s3_bucket: S3Bucket, tmp_path: Path, reorder: bool) -> None:
    tensors = _every_dtype()
    data = save(tensors, metadata={"format": "pt"})
    if reorder:
        data = _reorder_header(data)
        (length,) = struct.unpack("<Q", data[:8])
        listed = list(json.loads(data[8 : 8 + length]))
        assert listed[0] != "a.f32" and listed[0] != "__metadata__"
    original = tmp_path / "original.safetensors"
    original.write_bytes(data)
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="m/w.safetensors", Body=data)

    clock = PhaseClock()
    shard = RemoteShard(
        s3_bucket.client, s3_bucket.name, _remote(s3_bucket, "m/w.safetensors"),
        read_ahead=ReadAhead(chunk=64 * 1024, window=3 * 64 * 1024, workers=2), clock=clock,
        spool=tmp_path / "spool" / "w.safetensors",
    )  # fmt: skip
    offsets = [span.begin for span in shard.header.spans]
    assert offsets == sorted(offsets)  # consumed in data order whatever the JSON order
    got: dict[str, torch.Tensor] = {}
    for number, item in enumerate(shard.tensors()):
        if number % 2:  # half assembled, half streamed as pieces and assembled here
            got[item.name] = item.tensor()
        else:
            raw = b"".join(bytes(piece) for piece in item.pieces())
            dtype = next(d for d, st in TORCH_TO_ST.items() if st == item.span.dtype)
            got[item.name] = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(item.span.shape)
    digest = shard.finish()

    with safe_open(str(original), "pt") as reference:
        assert sorted(reference.keys()) == sorted(got)
        for name in reference.keys():  # noqa: SIM118
            want = reference.get_tensor(name)
            assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
            assert torch.equal(got[name].reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), name
    assert digest == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "spool" / "w.safetensors").read_bytes() == data


def test_reader_refuses_a_truncated_object_and_a_replaced_one(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    data = save(_every_dtype())
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="m/cut.safetensors", Body=data[: len(data) - 100])
    with pytest.raises(InputError, match="truncated"):
        RemoteShard(s3_bucket.client, s3_bucket.name, _remote(s3_bucket, "m/cut.safetensors"))

    large = save({"big": torch.randn(1024, 1024)})  # 4 MiB: more than the first GET reads
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="m/w.safetensors", Body=large)
    remote = _remote(s3_bucket, "m/w.safetensors")
    shard = RemoteShard(
        s3_bucket.client, s3_bucket.name, remote, read_ahead=ReadAhead(chunk=64 * 1024, window=64 * 1024)
    )
    # Replaced while being read: If-Match on the next ranged GET refuses the new version.
    s3_bucket.client.put_object(
        Bucket=s3_bucket.name, Key="m/w.safetensors", Body=save({"big": torch.zeros(1024, 1024)})
    )
    with pytest.raises(JobFailed, match="w.safetensors"):
        for item in shard.tensors():
            item.tensor()
    shard.close()


def _layout(tensors: dict[str, torch.Tensor]) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(name, TORCH_TO_ST[t.dtype], tuple(t.shape)) for name, t in tensors.items()]


def test_planned_writer_uploads_in_parts_what_safetensors_loads(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    tensors = {"z.big": torch.randn(3 * MiB // 4 * 4 // 4, 4), **_every_dtype()}  # 12 MiB + the rest
    header = build_header(_layout(tensors), {"format": "pt"})
    clock = PhaseClock()
    upload = MultipartObjectWriter(
        s3_bucket.client, s3_bucket.name, "out/w.safetensors", expected_bytes=header.file_bytes,
        window=UploadWindow(part=5 * MiB, in_flight=2), clock=clock, spool=tmp_path / "w.safetensors",
    )  # fmt: skip
    writer = PlannedShardWriter(header, upload, what="w")
    for number, (name, tensor) in enumerate(tensors.items()):
        if number % 2:
            raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            writer.add_raw(name, [memoryview(raw)[i : i + 1000] for i in range(0, len(raw), 1000)])
        else:
            writer.add(name, tensor)
    writer.check_complete()
    written = upload.close()

    body = s3_bucket.client.get_object(Bucket=s3_bucket.name, Key="out/w.safetensors")["Body"].read()
    assert written.size == len(body) == header.file_bytes
    assert written.sha256 == hashlib.sha256(body).hexdigest()
    assert (tmp_path / "w.safetensors").read_bytes() == body
    loaded = load(body)
    assert list(loaded) == sorted(tensors) or set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name
    assert parse_header(body, what="w", file_bytes=len(body)).spans == header.spans
    parts = s3_bucket.client.head_object(Bucket=s3_bucket.name, Key="out/w.safetensors", PartNumber=1)
    assert int(parts.get("PartsCount", 0)) >= 3  # it really went up as a multipart upload


def test_planned_writer_refuses_what_the_plan_does_not_say(s3_bucket: S3Bucket) -> None:
    header = build_header([("a", "F32", (2, 2)), ("b", "BF16", (3,))])
    sink = bytearray()

    class Sink:
        def write(self, data: bytes | bytearray | memoryview) -> None:
            sink.extend(data)

    writer = PlannedShardWriter(header, Sink(), what="out")
    with pytest.raises(ValueError, match="expected a next"):
        writer.add("b", torch.zeros(3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="planned layout says F32 \\[2, 2\\]"):
        writer.add("a", torch.zeros(4))
    writer.add("a", torch.zeros(2, 2))
    with pytest.raises(ValueError, match="b and 0 more were never written"):
        writer.check_complete()
    with pytest.raises(ValueError, match="has 2 bytes"):
        writer.add_raw("b", [memoryview(b"xx")])


def test_cancelled_upload_leaves_no_object_and_no_open_multipart_upload(s3_bucket: S3Bucket) -> None:
    cancel = CancelToken()
    upload = MultipartObjectWriter(
        s3_bucket.client, s3_bucket.name, "out/w.safetensors", expected_bytes=40 * MiB,
        window=UploadWindow(part=5 * MiB, in_flight=1), cancel=cancel,
    )  # fmt: skip
    upload.write(bytes(11 * MiB))  # two parts sent, one buffered
    assert s3_bucket.multipart_uploads("out/")
    cancel.cancel("stop requested")
    with pytest.raises(JobCancelled):
        upload.write(bytes(5 * MiB))
        upload.close()
    upload.abort()
    assert s3_bucket.keys("out/") == []
    assert s3_bucket.multipart_uploads("out/") == []
