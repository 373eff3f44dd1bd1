"""fetch_model against a real SeaweedFS server: prefixes, archives, https forms, cache, integrity."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from optjob.errors import InputError, JobCancelled
from optjob.runtime.cancel import CancelToken
from optjob.runtime.events import Event, EventSink
from optjob.storage.inputs import check_model_dir
from optjob.storage.publish import publish_model
from optjob.storage.s3 import S3Settings, make_client
from optjob.storage.source import fetch_model
from tests.support.s3server import S3Bucket, write_tiny_model


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _same_tree(left: Path, right: Path) -> None:
    names = sorted(p.relative_to(left).as_posix() for p in left.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(right).as_posix() for p in right.rglob("*") if p.is_file())
    for name in names:
        assert _sha(left / name) == _sha(right / name), name


def _count_gets(client: Any) -> list[str]:
    calls: list[str] = []
    client.meta.events.register("before-parameter-build.s3.GetObject", lambda params, **_: calls.append(params["Key"]))
    return calls


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_tiny_model(tmp_path / "src")


def test_prefix_download(s3_bucket: S3Bucket, model: Path, tmp_path: Path) -> None:
    s3_bucket.upload_dir(model, "models/tiny")
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="models/tiny/", Body=b"")  # console folder marker
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="models/tiny-other/x", Body=b"sibling")
    seen: list[Event] = []
    fetched = fetch_model(s3_bucket.uri("models/tiny"), tmp_path / "dest", events=EventSink(seen.append))
    _same_tree(model, tmp_path / "dest")
    assert fetched.path == tmp_path / "dest"
    assert fetched.total_bytes == sum(p.stat().st_size for p in model.iterdir())
    assert set(fetched.etags) == {f"models/tiny/{p.name}" for p in model.iterdir()}
    assert all(f.sha256 == _sha(model / f.path) for f in fetched.files)
    assert not fetched.from_cache and fetched.bytes_downloaded == fetched.total_bytes
    assert seen[-1].stage == "download" and seen[-1].fraction == 1.0
    check_model_dir(fetched.path)


def test_https_path_style_uri(s3_bucket: S3Bucket, model: Path, tmp_path: Path) -> None:
    s3_bucket.upload_dir(model, "m")
    uri = f"https://s3.us-east-1.amazonaws.com/{s3_bucket.name}/m/"
    fetched = fetch_model(uri, tmp_path / "dest")
    assert fetched.source_uri == uri
    _same_tree(model, tmp_path / "dest")


def test_missing_prefix_is_input_error(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="No objects under .*single .tar.gz"):
        fetch_model(s3_bucket.uri("nothing/here/"), tmp_path / "dest")
    with pytest.raises(InputError, match="bucket does not exist"):
        fetch_model("s3://no-such-bucket-optjob/m/", tmp_path / "dest")


def _tarball(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def test_targz_download_with_wrapping_folder(s3_bucket: S3Bucket, model: Path, tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(model, arcname="./tiny")
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="a/model.tar.gz", Body=buffer.getvalue())
    fetched = fetch_model(s3_bucket.uri("a/model.tar.gz"), tmp_path / "dest")
    assert fetched.archive and fetched.path == tmp_path / "dest" / "tiny"
    assert fetched.etags.keys() == {"a/model.tar.gz"}
    assert fetched.bytes_downloaded == len(buffer.getvalue())
    _same_tree(model, fetched.path)
    check_model_dir(fetched.path)


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize(
    ("member", "data", "message"),
    [
        (_member("../escape.txt"), b"x", r"contains '\.\.'"),
        (_member("/etc/cron.d/evil"), b"x", "absolute path"),
        (_member("tokenizer.json", tarfile.SYMTYPE, "/etc/passwd"), None, "is a symbolic link"),
        (_member("vocab.txt", tarfile.LNKTYPE, "config.json"), None, "is a hard link"),
        (_member("dev", tarfile.CHRTYPE), None, "device, FIFO or other special file"),
        (_member("fifo", tarfile.FIFOTYPE), None, "device, FIFO or other special file"),
        (_member("config.json"), b"{}", "holds config.json twice"),
        (_member("config.json/nested.json"), b"x", "not a valid .tar.gz archive"),
    ],
)
def test_unsafe_archive_members_refused(
    s3_bucket: S3Bucket, tmp_path: Path, member: tarfile.TarInfo, data: bytes | None, message: str
) -> None:
    body = _tarball([(_member("config.json"), b"{}"), (member, data)])
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="evil.tgz", Body=body)
    dest = tmp_path / "work" / "dest"
    with pytest.raises(InputError, match=message):
        fetch_model(s3_bucket.uri("evil.tgz"), dest)
    assert not dest.exists()
    assert list((tmp_path / "work").iterdir()) == []  # staging removed
    assert not (tmp_path / "escape.txt").exists()


def test_corrupt_archive(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="bad.tar.gz", Body=b"\x1f\x8b not really gzip")
    with pytest.raises(InputError, match="is not a valid .tar.gz archive"):
        fetch_model(s3_bucket.uri("bad.tar.gz"), tmp_path / "dest")


def test_cache_hit_downloads_nothing(s3_bucket: S3Bucket, model: Path, tmp_path: Path) -> None:
    s3_bucket.upload_dir(model, "m")
    settings = S3Settings(cache_dir=tmp_path / "cache")
    client = make_client(settings)
    gets = _count_gets(client)
    first = fetch_model(s3_bucket.uri("m/"), tmp_path / "one", settings=settings, client=client)
    assert not first.from_cache and len(gets) == len(first.files)
    gets.clear()
    second = fetch_model(s3_bucket.uri("m/"), tmp_path / "two", settings=settings, client=client)
    assert second.from_cache and second.bytes_downloaded == 0 and gets == []
    assert second.etags == first.etags and second.files == first.files
    _same_tree(model, tmp_path / "two")
    # A changed object has a new ETag, so the cache key changes and it is downloaded again.
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="m/tokenizer_config.json", Body=b'{"changed": 1}')
    third = fetch_model(s3_bucket.uri("m/"), tmp_path / "three", settings=settings, client=client)
    assert not third.from_cache and gets
    assert (tmp_path / "three" / "tokenizer_config.json").read_bytes() == b'{"changed": 1}'


def test_sha256_metadata_mismatch_fails_cleanly(s3_bucket: S3Bucket, model: Path, tmp_path: Path) -> None:
    s3_bucket.upload_dir(model, "m")
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="m/config.json", Body=b"{}", Metadata={"sha256": "0" * 64})
    with pytest.raises(InputError, match=r"m/config.json does not match its recorded sha256"):
        fetch_model(s3_bucket.uri("m/"), tmp_path / "work" / "dest")
    assert list((tmp_path / "work").iterdir()) == []


def test_s3_checksum_is_verified(s3_bucket: S3Bucket, model: Path, tmp_path: Path) -> None:
    s3_bucket.upload_dir(model, "m", ChecksumAlgorithm="SHA256")
    fetched = fetch_model(s3_bucket.uri("m/"), tmp_path / "dest")
    assert all(f.verified for f in fetched.files)


def _publish(s3_bucket: S3Bucket, model: Path, prefix: str) -> None:
    publish_model(model, s3_bucket.uri(prefix), manifest={"job_name": "j", "job_arn": "arn:j"}, kms_key_id=None)


def test_published_prefix_verified_against_manifest(s3_bucket: S3Bucket, model: Path, tmp_path: Path) -> None:
    _publish(s3_bucket, model, "out/")
    fetched = fetch_model(s3_bucket.uri("out/"), tmp_path / "dest")
    assert all(f.verified for f in fetched.files)
    assert not (tmp_path / "dest" / "optjob-manifest.json").exists()


def test_size_mismatch_with_manifest(s3_bucket: S3Bucket, model: Path, tmp_path: Path) -> None:
    _publish(s3_bucket, model, "out/")
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="out/config.json", Body=b"{}")
    with pytest.raises(InputError, match=r"out/config.json is 2 bytes but .*records \d+: it was modified"):
        fetch_model(s3_bucket.uri("out/"), tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_content_mismatch_with_manifest(s3_bucket: S3Bucket, model: Path, tmp_path: Path) -> None:
    _publish(s3_bucket, model, "out/")
    original = (model / "config.json").read_bytes()
    tampered = original.replace(b"llama", b"LLAMA")
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="out/config.json", Body=tampered)
    with pytest.raises(InputError, match="out/config.json does not match its recorded sha256"):
        fetch_model(s3_bucket.uri("out/"), tmp_path / "dest")


def test_manifest_lists_missing_file(s3_bucket: S3Bucket, model: Path, tmp_path: Path) -> None:
    _publish(s3_bucket, model, "out/")
    s3_bucket.client.delete_object(Bucket=s3_bucket.name, Key="out/tokenizer_config.json")
    with pytest.raises(InputError, match="lists tokenizer_config.json, which is missing"):
        fetch_model(s3_bucket.uri("out/"), tmp_path / "dest")


def test_cancel_between_chunks_leaves_nothing(s3_bucket: S3Bucket, model: Path, tmp_path: Path) -> None:
    s3_bucket.upload_dir(model, "m")
    token = CancelToken()

    def stop_once_downloading(event: Event) -> None:
        if event.step == "download":
            token.cancel("StopOptimizationJob")

    with pytest.raises(JobCancelled, match="StopOptimizationJob"):
        fetch_model(
            s3_bucket.uri("m/"), tmp_path / "work" / "dest", cancel=token, events=EventSink(stop_once_downloading)
        )
    assert list((tmp_path / "work").iterdir()) == []


def test_destination_must_be_empty(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "x").write_text("x")
    with pytest.raises(ValueError, match="absent or empty"):
        fetch_model(s3_bucket.uri("m/"), tmp_path / "dest")


def test_settings_come_from_standard_aws_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "7")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    client = make_client(S3Settings())
    assert client.meta.config.retries == {"mode": "adaptive", "total_max_attempts": 7}
    assert client.meta.endpoint_url == "http://127.0.0.1:1"
    assert client.meta.region_name == "eu-west-1"
    monkeypatch.delenv("AWS_RETRY_MODE")
    assert make_client(S3Settings(max_attempts=3)).meta.config.retries["mode"] == "standard"


def test_manifest_file_is_json(s3_bucket: S3Bucket, model: Path) -> None:
    _publish(s3_bucket, model, "out/")
    body = s3_bucket.client.get_object(Bucket=s3_bucket.name, Key="out/optjob-manifest.json")["Body"].read()
    assert json.loads(body)["job_arn"] == "arn:j"


def test_file_and_folder_with_one_name_refused(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    for key in ("m/config.json", "m/tok", "m/tok/vocab.txt"):
        s3_bucket.client.put_object(Bucket=s3_bucket.name, Key=key, Body=b"{}")
    with pytest.raises(InputError, match="tok is both a file and the folder of tok/vocab.txt"):
        fetch_model(s3_bucket.uri("m/"), tmp_path / "dest")
