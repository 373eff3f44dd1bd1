"""The streaming run of a data-free FP8 job against the real S3 server: overlapped, verified, atomic.

Covers what the shard-by-shard path must guarantee beyond "it completes": shards are quantized
while later ones are still arriving, the published model is complete and loads, a bad shard
fails the job with nothing left behind, and another job's published model is never touched.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from optjob.api.errors import parse
from optjob.api.shapes import CreateOptimizationJobRequest
from optjob.errors import InputError
from optjob.pipeline.plan import build_plan
from optjob.pipeline.run import run_plan
from optjob.pipeline.streaming import streaming_technique
from optjob.runtime.cancel import CancelToken
from optjob.runtime.events import Event, EventSink
from optjob.storage.layout import MANIFEST_NAME
from optjob.storage.stream import StreamingFetch
from tests.support.s3server import S3Bucket
from tests.support.stages import fp8_job_request

ARN = "arn:aws:sagemaker:us-east-1:000000000000:optimization-job/{}"


@pytest.fixture(scope="module")
def sharded_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from optjob.testing import build_tiny_llama

    return build_tiny_llama(
        tmp_path_factory.mktemp("tiny") / "model",
        hidden=128, intermediate=256, layers=4, heads=2, kv_heads=1, vocab=512, shards=4, train_steps=0,
    )  # fmt: skip


def _plan(name: str, source: str, output: str, scheme: str = "FP8_DYNAMIC"):
    request = parse(CreateOptimizationJobRequest, fp8_job_request(name, source, output, scheme))
    return build_plan(request, region="us-east-1")


def _run(plan, tmp_path: Path, events: list[Event] | None = None):
    sink = EventSink(events.append if events is not None else None)
    return run_plan(plan, work_dir=tmp_path / "work", job_arn=ARN.format(plan.job_name), events=sink)


def test_only_shard_by_shard_plans_stream(s3_bucket: S3Bucket) -> None:
    assert streaming_technique(_plan("a", s3_bucket.uri("m/"), s3_bucket.uri("o/"))) is not None
    assert streaming_technique(_plan("b", s3_bucket.uri("m/"), s3_bucket.uri("o/"), "FP8")) is None
    assert streaming_technique(_plan("c", s3_bucket.uri("m.tar.gz"), s3_bucket.uri("o/"))) is None


@pytest.mark.parametrize("granularity", ["tensor", "file"])
def test_streaming_job_overlaps_and_publishes_a_loadable_model(
    s3_bucket: S3Bucket, sharded_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, granularity: str
) -> None:
    monkeypatch.setenv("OPTJOB_STREAM_GRANULARITY", granularity)
    s3_bucket.upload_dir(sharded_model, "model")
    events: list[Event] = []
    outcome = _run(_plan("stream-1", s3_bucket.uri("model/"), s3_bucket.uri("out/")), tmp_path, events)

    # Quantization of the first shard is reported before the last weight file was handed over.
    steps = [(e.stage, e.step) for e in events]
    first_quantized = steps.index(("quantize", "shard"))
    last_arrival = len(steps) - 1 - steps[::-1].index(("download", "file"))
    assert first_quantized < last_arrival, steps

    keys = s3_bucket.keys("out/")
    shards = sorted(k for k in keys if k.endswith(".safetensors"))
    assert len(shards) == 4 and f"out/{MANIFEST_NAME}" in keys
    manifest = json.loads(s3_bucket.client.get_object(Bucket=s3_bucket.name, Key=f"out/{MANIFEST_NAME}")["Body"].read())
    assert sorted(f["path"] for f in manifest["files"]) == sorted(
        k[len("out/") :] for k in keys if k != f"out/{MANIFEST_NAME}"
    )
    verification = manifest["metrics"]["1:Quantization"]["verification"]
    assert verification["passed"] and verification["per_tensor"]["quantized_tensors"] == 4 * 7
    assert set(outcome.published) == {f["path"] for f in manifest["files"]}
    stage_metrics = manifest["metrics"]["1:Quantization"]
    if granularity == "tensor":  # where the time went, per phase, for the user to read
        phases = stage_metrics["streaming"]["phases_s"]
        assert set(phases) >= {"wait_download", "quantize", "verify", "hash", "wait_upload"}
        assert phases["quantize"] > 0 and phases["verify"] > 0 and phases["hash"] > 0
        assert stage_metrics["engine_details"]["granularity"] == "tensor"
    for entry in manifest["files"]:  # the sha256 computed on the way is the content's
        body = s3_bucket.client.get_object(Bucket=s3_bucket.name, Key=f"out/{entry['path']}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == entry["sha256"] and len(body) == entry["size"]

    local = tmp_path / "published"
    for key in keys:
        target = local / key[len("out/") :]
        target.parent.mkdir(parents=True, exist_ok=True)
        s3_bucket.client.download_file(s3_bucket.name, key, str(target))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(local)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    assert not (tmp_path / "work").exists()


def test_a_corrupt_shard_fails_the_job_and_leaves_nothing(
    s3_bucket: S3Bucket, sharded_model: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in sharded_model.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    third = sorted(broken.glob("*.safetensors"))[2]
    tensors = load_file(str(third))
    save_file({k: v for k, v in list(tensors.items())[:-1]}, str(third))  # a tensor the index promises is gone
    s3_bucket.upload_dir(broken, "model")
    with pytest.raises(InputError, match="in model-00003-of-00004.safetensors, whose header lacks it"):
        _run(_plan("stream-2", s3_bucket.uri("model/"), s3_bucket.uri("out/")), tmp_path)
    assert s3_bucket.keys("out/") == []
    assert s3_bucket.multipart_uploads("out/") == []


def test_a_failed_gate_rolls_back_shards_already_uploaded(
    s3_bucket: S3Bucket, sharded_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shards go up while they are checked; when the verdict is "fail", every one of them comes down."""
    import optjob.verify.gate as gate
    from optjob.errors import VerificationFailed

    real = gate.thresholds_for

    def impossible(scheme_key: str) -> dict:
        limits = real(scheme_key)
        limits["per_tensor"] = {**limits["per_tensor"], "max_rel_error": 1e-9}
        return limits

    from optjob.storage.publish import Publisher

    monkeypatch.setattr(gate, "thresholds_for", impossible)
    uploaded: list[str] = []
    real_upload = Publisher.upload

    def counting_upload(self: Publisher, rel: str, path: Path) -> object:
        result = real_upload(self, rel, path)
        uploaded.append(rel)
        return result

    real_streamed = Publisher.record_streamed

    def counting_streamed(self: Publisher, rel: str, written: object, local: Path | None = None) -> object:
        result = real_streamed(self, rel, written, local)  # type: ignore[arg-type]
        uploaded.append(rel)
        return result

    monkeypatch.setattr(Publisher, "upload", counting_upload)
    monkeypatch.setattr(Publisher, "record_streamed", counting_streamed)
    s3_bucket.upload_dir(sharded_model, "model")
    with pytest.raises(VerificationFailed, match="per-tensor relative error"):
        _run(_plan("gate-fails", s3_bucket.uri("model/"), s3_bucket.uri("out/")), tmp_path)
    assert uploaded  # shards went up before the verdict...
    assert s3_bucket.keys("out/") == []  # ...and every one was removed
    assert s3_bucket.multipart_uploads("out/") == []


def test_another_jobs_model_is_never_touched(s3_bucket: S3Bucket, sharded_model: Path, tmp_path: Path) -> None:
    s3_bucket.upload_dir(sharded_model, "model")
    _run(_plan("owner", s3_bucket.uri("model/"), s3_bucket.uri("out/")), tmp_path / "a")
    before = {k: s3_bucket.client.head_object(Bucket=s3_bucket.name, Key=k)["ETag"] for k in s3_bucket.keys("out/")}
    with pytest.raises(InputError, match="already holds the published model of job owner"):
        _run(_plan("intruder", s3_bucket.uri("model/"), s3_bucket.uri("out/")), tmp_path / "b")
    after = {k: s3_bucket.client.head_object(Bucket=s3_bucket.name, Key=k)["ETag"] for k in s3_bucket.keys("out/")}
    assert after == before


def test_streaming_fetch_hands_files_over_in_order_as_they_land(
    s3_bucket: S3Bucket, sharded_model: Path, tmp_path: Path
) -> None:
    s3_bucket.upload_dir(sharded_model, "model")
    fetch = StreamingFetch(s3_bucket.uri("model/"), tmp_path / "src", cancel=CancelToken())
    weights = sorted(rel for rel in fetch.remotes if rel.endswith(".safetensors"))
    fetch.start(order=weights)
    first = fetch.wait(weights[0])
    assert first.is_file() and first.stat().st_size == fetch.size(weights[0])
    deadline = time.monotonic() + 30
    result = fetch.result()
    assert time.monotonic() < deadline
    assert {f.path for f in result.files} == set(fetch.remotes)
    assert all(f.etag for f in result.files)


def test_streaming_fetch_never_shows_a_partial_or_unchecked_file(
    s3_bucket: S3Bucket, sharded_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stage copies the source directory's small files into the model it publishes; a file the
    transfer manager is still writing (or that is not yet checked) must never be there to copy."""
    import optjob.storage.stream as stream

    s3_bucket.upload_dir(sharded_model, "model")
    dest = tmp_path / "src"
    seen: list[tuple[str, set[str]]] = []
    real_hash = stream.sha256_file

    def hash_and_look(path: Path, cancel: CancelToken | None = None) -> str:
        # The moment a file is fully downloaded but not yet verified.
        seen.append((path.name, {p.name for p in dest.rglob("*") if p.is_file()} if dest.exists() else set()))
        return real_hash(path, cancel)

    monkeypatch.setattr(stream, "sha256_file", hash_and_look)
    fetch = StreamingFetch(s3_bucket.uri("model/"), dest, cancel=CancelToken())
    fetch.start(order=sorted(fetch.remotes))
    result = fetch.result()
    assert len(seen) == len(fetch.remotes)
    for name, present in seen:
        assert name not in present, f"{name} was in the source directory before it was checked"
        assert present <= set(fetch.remotes), f"unexpected files in the source directory: {present}"
    assert {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()} == {f.path for f in result.files}
    assert not fetch.incoming.exists()


def test_a_stop_in_the_middle_of_a_multipart_upload_publishes_nothing(
    s3_bucket: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stop arrives after the first part of a shard went up: the job ends cancelled, the open multipart
    upload is aborted, the parts already sent are gone, and the prefix holds nothing."""
    from optjob.errors import JobCancelled
    from optjob.storage.tensorstream.multipart import MultipartObjectWriter
    from optjob.testing import build_tiny_llama

    model = build_tiny_llama(tmp_path / "big", hidden=1024, intermediate=4096, layers=2, heads=8, kv_heads=4,
                             vocab=2048, shards=2, train_steps=0)  # fmt: skip
    assert max(p.stat().st_size for p in model.glob("*.safetensors")) > 20 << 20  # several 8 MiB parts
    s3_bucket.upload_dir(model, "model")
    cancel = CancelToken()
    sent: list[int] = []
    real = MultipartObjectWriter._upload_part

    def part_then_stop(self: MultipartObjectWriter, number: int, body: bytes) -> str:
        etag = real(self, number, body)
        sent.append(number)
        assert s3_bucket.multipart_uploads("out/")  # the upload is open while parts go up
        cancel.cancel("StopOptimizationJob")
        return etag

    monkeypatch.setattr(MultipartObjectWriter, "_upload_part", part_then_stop)
    plan = _plan("stop-mid-part", s3_bucket.uri("model/"), s3_bucket.uri("out/"))
    with pytest.raises(JobCancelled):
        run_plan(plan, work_dir=tmp_path / "work", job_arn=ARN.format(plan.job_name), cancel=cancel)
    assert sent
    assert s3_bucket.keys("out/") == []
    assert s3_bucket.multipart_uploads("out/") == []
    assert not (tmp_path / "work").exists()


def _published_tensors(bucket: S3Bucket, prefix: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    tensors: dict[str, torch.Tensor] = {}
    for key in bucket.keys(prefix):
        if key.endswith(".safetensors"):
            tensors.update(load(bucket.client.get_object(Bucket=bucket.name, Key=key)["Body"].read()))
    return tensors


@pytest.mark.parametrize("scheme", ["FP8_DYNAMIC", "FP8_BLOCK"])
def test_weights_quantized_in_row_blocks_equal_the_whole_tensor_result(
    s3_bucket: S3Bucket, sharded_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scheme: str
) -> None:
    """The tensor path quantizes big weights a block of rows at a time; the published tensors must be
    exactly those of the shard-at-a-time path, which quantizes each weight whole like oneshot."""
    import optjob.techniques.quantize.tensor_stream as tensor_stream

    s3_bucket.upload_dir(sharded_model, "model")
    monkeypatch.setenv("OPTJOB_STREAM_GRANULARITY", "file")
    tag = scheme.lower().replace("_", "-")
    _run(_plan(f"whole-{tag}", s3_bucket.uri("model/"), s3_bucket.uri("whole/"), scheme), tmp_path / "a")
    monkeypatch.setenv("OPTJOB_STREAM_GRANULARITY", "tensor")
    monkeypatch.setattr(tensor_stream, "BLOCK_BYTES", 32 * 1024)  # 128 rows of the 256-row gate and up weights
    outcome = _run(_plan(f"rows-{tag}", s3_bucket.uri("model/"), s3_bucket.uri("rows/"), scheme), tmp_path / "b")
    assert outcome.metrics["1:Quantization"]["engine_details"]["weights_quantized_in_row_blocks"] == 4 * 2
    whole, rows = _published_tensors(s3_bucket, "whole/"), _published_tensors(s3_bucket, "rows/")
    assert sorted(whole) == sorted(rows)
    for name, tensor in whole.items():
        assert rows[name].dtype == tensor.dtype and rows[name].shape == tensor.shape, name
        assert torch.equal(rows[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name
    figures = [_manifest_of(s3_bucket, p)["metrics"]["1:Quantization"]["verification"]["per_tensor"]
               for p in ("whole/", "rows/")]  # fmt: skip
    assert figures[0]["quantized_tensors"] == figures[1]["quantized_tensors"] == 4 * 7
    assert figures[1]["max_rel_error"] == pytest.approx(figures[0]["max_rel_error"], rel=1e-4)
    assert figures[1]["min_cosine"] == pytest.approx(figures[0]["min_cosine"], rel=1e-6)


def _manifest_of(bucket: S3Bucket, prefix: str) -> dict:
    return json.loads(bucket.client.get_object(Bucket=bucket.name, Key=f"{prefix}{MANIFEST_NAME}")["Body"].read())
