"""Issue #28 in a model source: a decompression bomb is refused on its headers, and only model files
travel on (a model's own Python code and anything else beside the model are left out, and said so).

Sources are real objects on a real S3 server (SeaweedFS, ``s3_bucket``) fetched with ``fetch_model``.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import pytest

from optjob.errors import InputError
from optjob.pipeline.plan import build_plan
from optjob.pipeline.transfer import SourceModel, build_manifest
from optjob.storage.s3 import S3Settings
from optjob.storage.source import fetch_model
from tests.support.jobs import make_request
from tests.support.s3server import S3Bucket, write_tiny_model

GIB = 2**30


class _Zeros(io.RawIOBase):
    """``size`` zero bytes, produced as they are read (the bomb is never held in memory)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        count = min(len(buffer), self.left)
        buffer[:count] = bytes(count)
        self.left -= count
        return count


def _model_tarball(model: Path, extra: list[tuple[str, int | bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as archive:
        archive.add(model, arcname=".")
        for name, content in extra:
            info = tarfile.TarInfo(name)
            if isinstance(content, int):
                info.size = content
                archive.addfile(info, io.BufferedReader(_Zeros(content), buffer_size=2**20))
            else:
                info.size = len(content)
                archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def test_a_decompression_bomb_is_refused_on_its_headers_and_nothing_is_kept(
    s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    model = write_tiny_model(tmp_path / "model")
    body = _model_tarball(model, [("zeros.bin", GIB)])  # 1 GiB of zeros beside the model
    assert len(body) < 16 * 2**20  # a few MiB on the wire
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="bomb/model.tar.gz", Body=body)
    cache = tmp_path / "cache"
    started = time.monotonic()
    with pytest.raises(InputError) as caught:
        fetch_model(s3_bucket.uri("bomb/model.tar.gz"), tmp_path / "dest", settings=S3Settings(cache_dir=cache))
    took = time.monotonic() - started
    reason = str(caught.value)
    assert "refused as a decompression bomb" in reason and "'zeros.bin'" in reason and "limit is 20:1" in reason
    assert took < 10, f"refusing took {took:.1f} s: the bomb was decompressed"
    assert not (tmp_path / "dest").exists()
    leftovers = [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
    assert sum(p.stat().st_size for p in leftovers) < 2**20, leftovers


def test_an_archive_of_too_many_files_is_refused(s3_bucket: S3Bucket, tmp_path: Path, monkeypatch) -> None:
    from optjob.limits import ArchiveLimits, limits

    small = limits().model_copy(update={"archive": ArchiveLimits(max_total_gib=1, max_files=10, max_ratio=20,
                                                                 ratio_floor_mib=256)})  # fmt: skip
    monkeypatch.setattr("optjob.storage.archive.limits", lambda: small)
    model = write_tiny_model(tmp_path / "model")
    body = _model_tarball(model, [(f"notes/{i}.txt", b"x") for i in range(20)])
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="many/model.tar.gz", Body=body)
    with pytest.raises(InputError, match="holds more than 10 members"):
        fetch_model(s3_bucket.uri("many/model.tar.gz"), tmp_path / "dest")


def _manifest_warnings(fetched) -> list[str]:
    plan = build_plan(make_request("dropped-job"), region="us-east-1")
    return build_manifest(plan, "arn:job", SourceModel(path=fetched.path, fetched=fetched), {}, [])["warnings"]


def test_only_model_files_leave_an_archive_and_the_manifest_says_what_was_left(
    s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    model = write_tiny_model(tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "modeling_evil.Model"}}))
    extra = [("modeling_evil.py", b"import os; os.system('curl evil')"), ("payload.exe", b"MZ" * 100)]
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="code/m.tar.gz", Body=_model_tarball(model, extra))
    fetched = fetch_model(s3_bucket.uri("code/m.tar.gz"), tmp_path / "dest")
    names = sorted(p.name for p in fetched.path.rglob("*") if p.is_file())
    assert "modeling_evil.py" not in names and "payload.exe" not in names and "config.json" in names
    assert sorted(fetched.dropped) == ["modeling_evil.py", "payload.exe"]
    (warning,) = _manifest_warnings(fetched)
    assert "2 source file(s) that are not model files were left out: modeling_evil.py, payload.exe" in warning
    assert "auto_map" in warning and "never run or republished" in warning


def test_only_model_files_are_downloaded_from_a_prefix(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    model = write_tiny_model(tmp_path / "model")
    (model / "modeling_custom.py").write_text("raise SystemExit('custom code ran')\n")
    s3_bucket.upload_dir(model, "prefix/")
    fetched = fetch_model(s3_bucket.uri("prefix/"), tmp_path / "dest")
    assert not (fetched.path / "modeling_custom.py").exists()
    assert fetched.dropped == ["modeling_custom.py"] and "modeling_custom.py" in _manifest_warnings(fetched)[0]
