"""publish_model against a real SeaweedFS server: layout, manifest last, ownership, SSE-KMS."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from optjob.errors import InputError, JobCancelled
from optjob.runtime.cancel import CancelToken
from optjob.runtime.events import Event, EventSink
from optjob.storage.publish import get_json, publish_file, publish_model, put_json, read_manifest
from optjob.storage.s3 import MiB, S3Settings, make_client
from tests.support.s3server import S3Bucket, write_tiny_model

JOB = {"job_name": "opt-1", "job_arn": "arn:aws:sagemaker:us-east-1:123456789012:optimization-job/opt-1"}
SMALL_PARTS = S3Settings(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=4)


@pytest.fixture
def output(tmp_path: Path) -> Path:
    out = write_tiny_model(tmp_path / "out")
    (out / "serving.properties").write_text("option.quantize=awq\n")
    (out / "sub").mkdir()
    (out / "sub" / "big.bin").write_bytes(hashlib.sha256(b"seed").digest() * (6 * MiB // 32 + 1))
    return out


def _record_writes(client: Any) -> list[str]:
    """Keys of completed writes, in completion order."""
    done: list[str] = []

    def after(http_response: Any, parsed: Any, model: Any, context: Any, **_: Any) -> None:
        done.append(context["optjob_key"])

    def before(params: Any, context: Any, **_: Any) -> None:
        context["optjob_key"] = params["Key"]

    for operation in ("PutObject", "CompleteMultipartUpload"):
        client.meta.events.register(f"before-parameter-build.s3.{operation}", before)
        client.meta.events.register(f"after-call.s3.{operation}", after)
    return done


def test_layout_manifest_last_and_sha256(s3_bucket: S3Bucket, output: Path) -> None:
    client = make_client(SMALL_PARTS)
    writes = _record_writes(client)
    manifest = {**JOB, "source": {"uri": "s3://in/m/", "etags": {"in/m/config.json": '"abc"'}},
                "techniques": [{"quantization": {"OPTION_QUANTIZE": "awq"}}], "metrics": {"ppl": 1.0},
                "timings": {"quantize_seconds": 12.5}}  # fmt: skip
    seen: list[Event] = []
    result = publish_model(output, s3_bucket.uri("jobs/opt-1"), manifest=manifest, kms_key_id=None,
                           settings=SMALL_PARTS, client=client, events=EventSink(seen.append))  # fmt: skip
    local = sorted(p.relative_to(output).as_posix() for p in output.rglob("*") if p.is_file())
    # The prefix itself is the model directory, uncompressed, plus the manifest.
    assert s3_bucket.keys("jobs/opt-1/") == sorted([f"jobs/opt-1/{rel}" for rel in local]
                                                    + ["jobs/opt-1/optjob-manifest.json"])  # fmt: skip
    assert writes[-1] == "jobs/opt-1/optjob-manifest.json"
    # The claim first (a rerun of the job after a crash may take the prefix back), the manifest last.
    assert writes[0] == "jobs/opt-1/optjob-progress.json"
    assert sorted(writes[1:-1]) == [f"jobs/opt-1/{rel}" for rel in local]
    stored = json.loads(
        s3_bucket.client.get_object(Bucket=s3_bucket.name, Key="jobs/opt-1/optjob-manifest.json")["Body"].read()
    )
    assert stored == result.manifest
    assert stored["job_arn"] == JOB["job_arn"] and stored["source"]["uri"] == "s3://in/m/"
    assert stored["techniques"] == manifest["techniques"] and stored["metrics"] == {"ppl": 1.0}
    assert stored["timings"]["quantize_seconds"] == 12.5 and "publish_upload_seconds" in stored["timings"]
    assert {"boto3", "torch", "safetensors"} <= stored["library_versions"].keys()
    for item in stored["files"]:
        body = s3_bucket.client.get_object(Bucket=s3_bucket.name, Key=f"jobs/opt-1/{item['path']}")["Body"].read()
        assert len(body) == item["size"] and hashlib.sha256(body).hexdigest() == item["sha256"]
    assert [f["path"] for f in stored["files"]] == local
    assert s3_bucket.multipart_uploads() == []
    assert seen[-1].step == "done" and seen[-1].fraction == 1.0
    assert read_manifest(s3_bucket.uri("jobs/opt-1/")) == stored


def test_foreign_manifest_is_not_overwritten(s3_bucket: S3Bucket, output: Path, tmp_path: Path) -> None:
    publish_model(output, s3_bucket.uri("out/"), manifest=JOB, kms_key_id=None)
    before = s3_bucket.keys()
    other = {"job_name": "opt-2", "job_arn": "arn:aws:sagemaker:us-east-1:123456789012:optimization-job/opt-2"}
    other_dir = write_tiny_model(tmp_path / "other", shards=1)
    with pytest.raises(InputError, match="already holds the published model of job opt-1 .*not overwritten"):
        publish_model(other_dir, s3_bucket.uri("out/"), manifest=other, kms_key_id=None)
    assert s3_bucket.keys() == before
    assert read_manifest(s3_bucket.uri("out/"))["job_name"] == "opt-1"  # type: ignore[index]

    result = publish_model(other_dir, s3_bucket.uri("out/"), manifest=other, kms_key_id=None, overwrite=True)
    assert result.replaced_job_arn == JOB["job_arn"]
    assert s3_bucket.keys("out/") == sorted(
        ["out/optjob-manifest.json"] + [f"out/{p.name}" for p in other_dir.iterdir()]
    )  # the replaced model's extra files are gone
    assert read_manifest(s3_bucket.uri("out/"))["job_name"] == "opt-2"  # type: ignore[index]


def test_same_job_may_republish(s3_bucket: S3Bucket, output: Path) -> None:
    publish_model(output, s3_bucket.uri("out/"), manifest=JOB, kms_key_id=None)
    publish_model(output, s3_bucket.uri("out/"), manifest=JOB, kms_key_id=None)
    assert read_manifest(s3_bucket.uri("out/")) is not None


def test_prefix_with_unknown_objects_refused(s3_bucket: S3Bucket, output: Path) -> None:
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="out/config.json", Body=b"{}")
    put_json(s3_bucket.uri("out/optjob-status.json"), {"status": "INPROGRESS"})  # the worker's own object
    with pytest.raises(InputError, match=r"already holds 1 object\(s\) \(e.g. out/config.json\)"):
        publish_model(output, s3_bucket.uri("out/"), manifest=JOB, kms_key_id=None)


def test_sse_kms(s3_bucket: S3Bucket, output: Path) -> None:
    key_id = s3_bucket.server.kms_key_id
    publish_model(output, s3_bucket.uri("enc/"), manifest=JOB, kms_key_id=key_id, settings=SMALL_PARTS)
    keys = s3_bucket.keys("enc/")
    assert "enc/sub/big.bin" in keys  # multipart, also encrypted
    for key in keys:
        head = s3_bucket.client.head_object(Bucket=s3_bucket.name, Key=key)
        assert head["ServerSideEncryption"] == "aws:kms", key
        assert head.get("SSEKMSKeyId"), key
    put_json(s3_bucket.uri("enc/optjob-status.json"), {"s": 1}, kms_key_id=key_id)
    head = s3_bucket.client.head_object(Bucket=s3_bucket.name, Key="enc/optjob-status.json")
    assert head["ServerSideEncryption"] == "aws:kms"


def test_unusable_kms_key_fails_without_manifest(s3_bucket: S3Bucket, output: Path) -> None:
    # AWS answers KMS.NotFoundException; SeaweedFS answers a bare InternalError, which the publisher
    # tells apart by the same write without the key succeeding: an InputError naming KmsKeyId either way.
    bad_key = "arn:aws:kms:us-east-1:123456789012:key/00000000-0000-0000-0000-000000000000"
    settings = SMALL_PARTS.model_copy(update={"max_attempts": 1})
    with pytest.raises(InputError, match="Cannot write to s3://.*/enc/ encrypted with OutputConfig.KmsKeyId"):
        publish_model(output, s3_bucket.uri("enc/"), manifest=JOB, kms_key_id=bad_key, settings=settings)
    assert s3_bucket.keys("enc/") == []
    assert s3_bucket.multipart_uploads() == []


def test_cancel_mid_upload_leaves_nothing(s3_bucket: S3Bucket, output: Path) -> None:
    token = CancelToken()

    def stop_once_uploading(event: Event) -> None:
        if event.step == "upload":
            token.cancel("StopOptimizationJob")

    with pytest.raises(JobCancelled):
        publish_model(output, s3_bucket.uri("out/"), manifest=JOB, kms_key_id=None, settings=SMALL_PARTS,
                      cancel=token, events=EventSink(stop_once_uploading))  # fmt: skip
    assert s3_bucket.keys("out/") == []
    assert s3_bucket.multipart_uploads() == []


def test_manifest_must_name_the_job(s3_bucket: S3Bucket, output: Path) -> None:
    with pytest.raises(ValueError, match="job_name and job_arn"):
        publish_model(output, s3_bucket.uri("out/"), manifest={"job_name": "x"}, kms_key_id=None)


def test_local_symlink_refused(s3_bucket: S3Bucket, output: Path, tmp_path: Path) -> None:
    (tmp_path / "outside").write_text("secret")
    (output / "leak.txt").symlink_to(tmp_path / "outside")
    with pytest.raises(ValueError, match="leak.txt is a link"):
        publish_model(output, s3_bucket.uri("out/"), manifest=JOB, kms_key_id=None)
    assert s3_bucket.keys() == []


def test_json_and_file_helpers(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    uri = s3_bucket.uri("jobs/x/optjob-status.json")
    put_json(uri, {"status": "COMPLETED", "n": 1})
    assert get_json(uri) == {"status": "COMPLETED", "n": 1}
    assert get_json(s3_bucket.uri("jobs/x/missing.json")) is None
    assert read_manifest(s3_bucket.uri("jobs/x/")) is None
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 1000)
    digest = publish_file(path, s3_bucket.uri("jobs/x/f.bin"))
    head = s3_bucket.client.head_object(Bucket=s3_bucket.name, Key="jobs/x/f.bin")
    assert head["Metadata"]["sha256"] == digest == hashlib.sha256(b"x" * 1000).hexdigest()


def test_a_rerun_takes_back_the_prefix_its_dead_attempt_left_and_nobody_else_does(
    s3_bucket: S3Bucket, output: Path
) -> None:
    """A worker killed mid-publish leaves files and its claim; the same job run again may publish there
    (leftovers it does not reuse are deleted), another job may not."""
    from optjob.storage.publish import Publisher

    dead = Publisher(s3_bucket.uri("p/"), job_name="opt-1", job_arn=JOB["job_arn"], kms_key_id=None)
    dead.open()  # writes the claim; then the process "dies" after one file
    dead.upload("partial.bin", next(p for p in output.rglob("*") if p.is_file()))
    assert "p/optjob-progress.json" in s3_bucket.keys("p/")

    other = {"job_name": "opt-2", "job_arn": JOB["job_arn"].replace("opt-1", "opt-2")}
    with pytest.raises(InputError, match="that no optjob job published"):
        publish_model(output, s3_bucket.uri("p/"), manifest=other, kms_key_id=None)

    result = publish_model(output, s3_bucket.uri("p/"), manifest=dict(JOB), kms_key_id=None)
    keys = {key[len("p/") :] for key in s3_bucket.keys("p/")}
    assert keys == {f.path for f in result.files} | {"optjob-manifest.json"}  # no claim, no leftover
    assert "partial.bin" not in keys
