"""Runs ``optjob serve`` as a real subprocess on a free loopback port, for tests that speak HTTP."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import boto3
from botocore.config import Config

ACCESS_KEY = "AKIAOPTJOBTEST000001"
SECRET_KEY = "optjob/test/secret/key/0123456789abcdef"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Server:
    url: str
    home: Path
    env: dict[str, str]

    def client(self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY, **config: object):
        return boto3.client(
            "sagemaker",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=Config(parameter_validation=False, retries={"max_attempts": 1}, **config),
        )


@contextmanager
def running_server(
    home: Path, *, extra_env: dict[str, str] | None = None, args: tuple[str, ...] = ()
) -> Iterator[Server]:
    port = free_port()
    env = {
        **os.environ,
        "OPTJOB_HOME": str(home),
        "OPTJOB_AUTH_KEYS": f"{ACCESS_KEY}:{SECRET_KEY}",
        "AWS_REGION": "us-east-1",
        "OPTJOB_EXECUTOR_IDLE_SECONDS": "2",
        **(extra_env or {}),
    }
    home.mkdir(parents=True, exist_ok=True)
    log = (home / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "optjob", "serve", "--port", str(port), *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"optjob serve exited {proc.returncode}: {(home / 'server.log').read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("optjob serve did not start in 30 s") from None
                time.sleep(0.1)
        yield Server(url=url, home=home, env=env)
    finally:
        with contextlib.suppress(ProcessLookupError):  # it may have exited already (a refused start)
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def wait_terminal(client, name: str, timeout: float = 60) -> dict:
    """Describe ``name`` through ``client`` until it is COMPLETED, FAILED or STOPPED."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        described = client.describe_optimization_job(OptimizationJobName=name)
        if described["OptimizationJobStatus"] in {"COMPLETED", "FAILED", "STOPPED"}:
            return described
        time.sleep(0.2)
    raise AssertionError(f"{name} did not reach a terminal state within {timeout} s")
