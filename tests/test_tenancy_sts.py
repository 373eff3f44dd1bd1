"""``optjob serve --assume-role``: each job gets temporary credentials from a real STS AssumeRole.

SeaweedFS implements STS on its S3 port (roles with trust policies and attached policies from its
IAM config), so the whole path runs for real: the server's own identity has no S3 rights at all and
is trusted by the roles; a job's worker assumes its RoleArn with the job's name as the session name
and reads and writes S3 with the session's keys; a role that does not trust optjob fails the job
with STS's answer. SeaweedFS logs the AssumeRole call and each request made with a session.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator

import pytest

from optjob.testing.local_s3 import S3Server, run_weed_mini
from tests.support.server_process import Server, running_server, wait_terminal
from tests.test_tenancy import EXAMPLE, keys

ACCOUNT = "111111111111"
TEAM = ("AKIATEAMSTS000000001", "team-sts-secret-0123456789abcdefgh")
SERVER = ("OPTJOBSERVERKEY00001", "optjob-server-secret-0123456789ab")  # optjob's own: no S3 rights
SOURCE, OUTPUT = "sts-models", "sts-out"
OPTIMIZER = f"arn:aws:iam::{ACCOUNT}:role/optimizer"
UNTRUSTING = f"arn:aws:iam::{ACCOUNT}:role/untrusting"


def _role(name: str, principal: str) -> dict:
    return {
        "roleName": name,
        "roleArn": f"arn:aws:iam::{ACCOUNT}:role/{name}",
        "trustPolicy": {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Principal": {"AWS": principal}, "Action": ["sts:AssumeRole"]}],
        },
        "attachedPolicies": ["ModelsAndOutput"],
    }


IAM = {
    "sts": {
        "tokenDuration": "1h",
        "maxSessionLength": "12h",
        "issuer": "optjob-test-sts",
        "accountId": ACCOUNT,
        "signingKey": base64.b64encode(b"optjob-test-sts-signing-key-32b!").decode(),
    },
    "policy": {"defaultEffect": "Deny"},
    "roles": [
        _role("optimizer", "arn:aws:iam::000000000000:user/optjob-server"),
        _role("untrusting", "arn:aws:iam::000000000000:user/someone-else"),
    ],
    "policies": [
        {
            "name": "ModelsAndOutput",
            "document": {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Action": ["s3:*"],
                        "Resource": [f"arn:aws:s3:::{b}{suffix}" for b in (SOURCE, OUTPUT) for suffix in ("", "/*")],
                    }
                ],
            },
        }
    ],
}


@pytest.fixture(scope="module")
def sts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[S3Server, Server]]:
    from optjob.testing import build_tiny_llama

    root = tmp_path_factory.mktemp("sts")
    model = build_tiny_llama(
        root / "model", hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=300, shards=2, train_steps=0
    )
    server_identity = {"name": "optjob-server", "credentials": [{"accessKey": SERVER[0], "secretKey": SERVER[1]}]}
    with run_weed_mini(identities=[{**server_identity, "actions": []}], iam=IAM, request_log=True) as s3:
        admin = s3.client()
        for bucket in (SOURCE, OUTPUT):
            admin.create_bucket(Bucket=bucket)
        for item in model.iterdir():
            admin.upload_file(str(item), SOURCE, f"tiny-llama/{item.name}")
        credentials = root / "credentials"
        credentials.write_text(
            f"[team-sts]\naws_access_key_id = {TEAM[0]}\naws_secret_access_key = {TEAM[1]}\n"
            f"aws_account_id = {ACCOUNT}\n"
        )
        credentials.chmod(0o600)
        env = {
            **s3.aws_env(),
            "AWS_ACCESS_KEY_ID": SERVER[0],
            "AWS_SECRET_ACCESS_KEY": SERVER[1],
            "AWS_ENDPOINT_URL_STS": s3.endpoint_url,
        }
        args = ("--credentials-file", str(credentials), "--assume-role")
        with running_server(root / "home", extra_env=env, args=args) as server:
            yield s3, server


def _spec(name: str, role: str) -> dict:
    request = json.loads(EXAMPLE.read_text())
    request.update(OptimizationJobName=name, RoleArn=role, Tags=[])
    request["ModelSource"] = {"S3": {"S3Uri": f"s3://{SOURCE}/tiny-llama/"}}
    request["OutputConfig"] = {"S3OutputLocation": f"s3://{OUTPUT}/{name}/"}
    return request


def test_jobs_assume_their_role_with_the_job_name_as_session(sts: tuple[S3Server, Server]) -> None:
    s3, server = sts
    client = server.client(*TEAM)
    assert s3.log_path is not None
    since = s3.log_path.stat().st_size
    client.create_optimization_job(**_spec("sts-job", OPTIMIZER))
    client.create_optimization_job(**_spec("distrusted", UNTRUSTING))
    done = wait_terminal(client, "sts-job", 180)
    refused = wait_terminal(client, "distrusted", 180)
    log = s3.log_path.read_bytes()[since:].decode(errors="replace")

    assert done["OptimizationJobStatus"] == "COMPLETED", done.get("FailureReason")
    assert "optjob-manifest.json" in {key.rsplit("/", 1)[-1] for key in keys(s3, OUTPUT, "sts-job/")}
    assert f"AssumeRole: caller identity=optjob-server, roleArn={OPTIMIZER}, sessionName=sts-job" in log
    assert "assumed-role/optimizer/sts-job" in log
    requests = re.findall(r'stats\.go:\d+\]? "([^"]*)" (\w+) "([^"]*)" (\d+)', log)
    by_server = {(method, path) for identity, method, path, _ in requests if identity == "optjob-server"}
    assert by_server == {("POST", "/")}  # optjob's own key signed the STS calls and nothing else
    session_puts = [p for i, m, p, s in requests if re.fullmatch(r"[0-9a-f]{32}", i) and m == "PUT" and s == "200"]
    assert any(path.startswith(f"/{OUTPUT}/sts-job/") for path in session_puts)

    assert refused["OptimizationJobStatus"] == "FAILED"
    assert refused["FailureReason"].startswith(f"Could not assume role {UNTRUSTING}: STS answered AccessDenied")
    assert keys(s3, OUTPUT, "distrusted/") == []
    for path in server.home.rglob("*"):
        if path.is_file():
            assert SERVER[1].encode() not in path.read_bytes() and TEAM[1].encode() not in path.read_bytes(), path
