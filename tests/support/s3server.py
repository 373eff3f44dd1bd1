"""pytest fixtures for the real S3 server (``optjob.testing.local_s3``): one per session, a bucket per test.

Listed in ``tests/conftest.py``'s ``pytest_plugins``, so every test module can ask for ``s3_server``
or ``s3_bucket``.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import pytest

from optjob.testing.local_s3 import (  # noqa: F401 - re-exported for test modules
    ACCESS_KEY,
    KMS_KEY_ID,
    REGION,
    SECRET_KEY,
    S3Bucket,
    S3Server,
    free_port,
    run_weed_mini,
    upload_dir,
    write_tiny_model,
)

_shared: dict[str, S3Server] = {}


@pytest.fixture(scope="session")
def s3_server(request: pytest.FixtureRequest) -> S3Server:
    """One SeaweedFS server for the whole session: endpoint URL, credentials, region, KMS key id.

    Test modules that import this fixture each get their own session-scoped definition of it;
    the server is kept here, started once, and stopped when pytest finishes.
    """
    if "server" not in _shared:
        stack = contextlib.ExitStack()
        _shared["server"] = stack.enter_context(run_weed_mini())

        def stop() -> None:
            _shared.pop("server", None)
            stack.close()

        request.config.add_cleanup(stop)
    return _shared["server"]


@pytest.fixture
def s3_bucket(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Bucket]:
    """A fresh bucket, a client for it, and the standard AWS env vars pointing boto3 at the server."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.aws_env().items():
        monkeypatch.setenv(name, value)
    client = s3_server.client()
    bucket = S3Bucket(name=f"t-{uuid.uuid4().hex[:16]}", client=client, server=s3_server)
    client.create_bucket(Bucket=bucket.name)
    yield bucket
    with contextlib.suppress(Exception):
        for upload in bucket.multipart_uploads():
            client.abort_multipart_upload(Bucket=bucket.name, Key=upload["Key"], UploadId=upload["UploadId"])
        client.delete_bucket(Bucket=bucket.name)
