"""Dropped connections between client and server: transfers complete through retries or fail cleanly.

A FaultProxy sits between boto3 and SeaweedFS (``AWS_ENDPOINT_URL_S3`` points at it). Clean
failure means: a JobFailed naming the object, no manifest, no multipart uploads left open, no
objects left under the output prefix, and no partial model in the download directory or cache.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from optjob.errors import InfrastructureError
from optjob.storage.publish import publish_model, read_manifest
from optjob.storage.s3 import MiB, S3Settings
from optjob.storage.source import fetch_model
from tests.support.s3server import S3Bucket, write_tiny_model
from tests.support.tcp_proxy import FaultProxy

JOB = {"job_name": "faulty", "job_arn": "arn:aws:sagemaker:us-east-1:123456789012:optimization-job/faulty"}
SETTINGS = S3Settings(
    multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=4,
    max_attempts=4, connect_timeout_s=2, read_timeout_s=5,
)  # fmt: skip



@pytest.fixture
def proxy(s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    upstream = urlsplit(s3_bucket.server.endpoint_url)
    with FaultProxy(upstream.hostname or "127.0.0.1", upstream.port or 80) as fault_proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", fault_proxy.url)
        yield fault_proxy


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = write_tiny_model(tmp_path / "model")
    (path / "big-part.bin").write_bytes(os.urandom(11 * MiB))  # multipart-sized; a name sources keep
    return path


def _tree_digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def test_download_survives_dropped_connections(
    s3_bucket: S3Bucket, proxy: FaultProxy, model: Path, tmp_path: Path
) -> None:
    s3_bucket.upload_dir(model, "m")
    proxy.reset_connections(count=2)
    proxy.cut_connections(after_bytes=300_000, direction="down", count=3)
    fetched = fetch_model(s3_bucket.uri("m/"), tmp_path / "dest", settings=SETTINGS)
    assert proxy.faults_applied == 5
    assert _tree_digests(tmp_path / "dest") == _tree_digests(model)
    assert fetched.total_bytes == sum(p.stat().st_size for p in model.iterdir())


def test_archive_stream_resumes_after_cuts(s3_bucket: S3Bucket, proxy: FaultProxy, tmp_path: Path) -> None:
    payload = os.urandom(3 * MiB)  # incompressible, so the archive is about as large
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in (("config.json", b"{}"), ("weights.safetensors", payload)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="m.tar.gz", Body=buffer.getvalue())
    proxy.cut_connections(after_bytes=700_000, direction="down", count=3)
    fetched = fetch_model(s3_bucket.uri("m.tar.gz"), tmp_path / "dest", settings=SETTINGS)
    assert proxy.faults_applied == 3
    assert (fetched.path / "weights.safetensors").read_bytes() == payload


def test_download_that_never_succeeds_fails_cleanly(
    s3_bucket: S3Bucket, proxy: FaultProxy, model: Path, tmp_path: Path
) -> None:
    s3_bucket.upload_dir(model, "m")
    cache = tmp_path / "cache"
    settings = SETTINGS.model_copy(update={"cache_dir": cache, "max_attempts": 2})
    proxy.cut_connections(after_bytes=200_000, direction="down", count=None)
    with pytest.raises(InfrastructureError, match=r"Cannot download s3://.*/m/big-part.bin"):
        fetch_model(s3_bucket.uri("m/"), tmp_path / "dest", settings=settings)
    assert not (tmp_path / "dest").exists()
    assert list(cache.iterdir()) == []  # no staging dir, no cache entry, no marker


def test_upload_survives_dropped_connections(s3_bucket: S3Bucket, proxy: FaultProxy, model: Path) -> None:
    proxy.reset_connections(count=2)
    proxy.cut_connections(after_bytes=1 * MiB, direction="up", count=3)
    result = publish_model(model, s3_bucket.uri("out/"), manifest=JOB, kms_key_id=None, settings=SETTINGS)
    assert proxy.faults_applied == 5
    manifest = read_manifest(s3_bucket.uri("out/"), client=s3_bucket.client)
    assert manifest == result.manifest
    digests = _tree_digests(model)
    for item in manifest["files"]:
        body = s3_bucket.client.get_object(Bucket=s3_bucket.name, Key=f"out/{item['path']}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == item["sha256"] == digests[item["path"]]
    assert s3_bucket.multipart_uploads() == []


def test_upload_that_never_succeeds_leaves_no_manifest(s3_bucket: S3Bucket, proxy: FaultProxy, model: Path) -> None:
    settings = SETTINGS.model_copy(update={"max_attempts": 2})
    proxy.cut_connections(after_bytes=1 * MiB, direction="up", count=None)
    with pytest.raises(InfrastructureError, match=r"Cannot upload s3://.*/out/big-part.bin"):
        publish_model(model, s3_bucket.uri("out/"), manifest=JOB, kms_key_id=None, settings=settings)
    # Inspect through the direct client, not the proxy.
    assert s3_bucket.keys("out/") == []
    assert s3_bucket.multipart_uploads() == []
