"""One server, several accounts: isolation in the API, and jobs that reach S3 only with their role's keys.

Everything is real: ``optjob serve`` as a subprocess with a credentials file naming two accounts
and a roles file; SeaweedFS started with one identity per role, each with rights on some buckets
only, logging every request with the identity that signed it; jobs that really run (sharding of
a tiny Llama) on the server's executor; boto3 and the AWS CLI as the clients.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import botocore.exceptions
import pytest

from optjob.testing.local_s3 import S3Server, run_weed_mini
from tests.support.server_process import SECRET_KEY as SERVER_SECRET
from tests.support.server_process import Server, running_server, wait_terminal

ACCOUNT_A, ACCOUNT_B = "111111111111", "222222222222"
KEYS = {  # principal -> (access key id, secret): the callers of optjob
    "team-a": ("AKIATEAMA00000000001", "team-a-secret-0123456789abcdefghij"),
    "team-b": ("AKIATEAMB00000000001", "team-b-secret-0123456789abcdefghij"),
}
ROLES = {  # role ARN -> (SeaweedFS identity, access key id, secret): what a job with that role gets
    f"arn:aws:iam::{ACCOUNT_A}:role/optimizer": (
        "role-a-optimizer",
        "ROLEAOPTIMIZER000001",
        "role-a-opt-secret-0123456789",
    ),
    f"arn:aws:iam::{ACCOUNT_A}:role/read-only": (
        "role-a-readonly",
        "ROLEAREADONLY0000001",
        "role-a-ro-secret-0123456789a",
    ),
    f"arn:aws:iam::{ACCOUNT_B}:role/optimizer": (
        "role-b-optimizer",
        "ROLEBOPTIMIZER000001",
        "role-b-opt-secret-0123456789",
    ),
}
SOURCE, OUT_A, OUT_B = "tenancy-models", "tenancy-out-a", "tenancy-out-b"
RIGHTS = {  # SeaweedFS identity -> actions (bucket-scoped)
    "role-a-optimizer": [f"Read:{SOURCE}", f"List:{SOURCE}", f"Read:{OUT_A}", f"List:{OUT_A}", f"Write:{OUT_A}"],
    "role-a-readonly": [f"Read:{SOURCE}", f"List:{SOURCE}", f"Read:{OUT_A}", f"List:{OUT_A}"],
    "role-b-optimizer": [f"Read:{OUT_B}", f"List:{OUT_B}", f"Write:{OUT_B}"],  # cannot read the models
}
SECRETS = [secret for _, secret in KEYS.values()] + [secret for *_, secret in ROLES.values()]
EXAMPLE = Path(__file__).resolve().parent.parent / "configs" / "examples" / "shard-tp2-g6-12xlarge.json"


@dataclass
class Setup:
    s3: S3Server
    server: Server
    roles_file: Path
    credentials_file: Path

    def client(self, principal: str):
        return self.server.client(*KEYS[principal])


def _private(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def write_credentials(path: Path) -> Path:
    accounts = {"team-a": ACCOUNT_A, "team-b": ACCOUNT_B}
    return _private(
        path,
        "".join(
            f"[{name}]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\n"
            f"aws_account_id = {accounts[name]}\n\n"
            for name, (key, secret) in KEYS.items()
        ),
    )


def write_roles(path: Path) -> Path:
    return _private(
        path,
        "".join(
            f"[{arn}]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\n\n"
            for arn, (_, key, secret) in ROLES.items()
        ),
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    from optjob.testing import build_tiny_llama

    identities = [
        {"name": identity, "credentials": [{"accessKey": key, "secretKey": secret}], "actions": RIGHTS[identity]}
        for identity, key, secret in ROLES.values()
    ]
    root = tmp_path_factory.mktemp("tenancy")
    model = build_tiny_llama(
        root / "model", hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=300, shards=2, train_steps=0
    )
    with run_weed_mini(identities=identities, request_log=True) as s3:
        admin = s3.client()
        for bucket in (SOURCE, OUT_A, OUT_B):
            admin.create_bucket(Bucket=bucket)
        for item in model.iterdir():
            admin.upload_file(str(item), SOURCE, f"tiny-llama/{item.name}")
        credentials_file = write_credentials(root / "credentials")
        roles_file = write_roles(root / "roles")
        # The server itself runs with the S3 admin's keys in its environment: the tests show that no
        # job ever signs with them.
        env = {**s3.aws_env(), "OPTJOB_EXECUTOR_SLOTS": "1"}
        args = ("--credentials-file", str(credentials_file), "--roles-file", str(roles_file))
        with running_server(root / "home", extra_env=env, args=args) as server:
            yield Setup(s3, server, roles_file, credentials_file)


def spec(name: str, role: str, output: str) -> dict:
    request = json.loads(EXAMPLE.read_text())
    request.update(OptimizationJobName=name, RoleArn=role, Tags=[])
    request["ModelSource"] = {"S3": {"S3Uri": f"s3://{SOURCE}/tiny-llama/"}}
    request["OutputConfig"] = {"S3OutputLocation": output}
    return request


_REQUEST_LINE = re.compile(r'stats\.go:\d+\]? "([^"]*)" (\w+) "([^"]*)" (\d+)')


def s3_requests(s3: S3Server, since: int) -> list[tuple[str, str, str, int]]:
    """(identity, method, path, status) of every request SeaweedFS logged after byte ``since``."""
    assert s3.log_path is not None
    text = s3.log_path.read_bytes()[since:].decode(errors="replace")
    return [(m[1], m[2], m[3], int(m[4])) for m in _REQUEST_LINE.finditer(text)]


def keys(s3: S3Server, bucket: str, prefix: str) -> list[str]:
    listed = s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for item in listed.get("Contents", [])]


def test_two_accounts_share_a_name_and_see_only_their_own_jobs(setup: Setup) -> None:
    a, b = setup.client("team-a"), setup.client("team-b")
    role_a, role_b = f"arn:aws:iam::{ACCOUNT_A}:role/optimizer", f"arn:aws:iam::{ACCOUNT_B}:role/optimizer"
    arn_a = a.create_optimization_job(**spec("same-name", role_a, f"s3://{OUT_A}/same-name/"))["OptimizationJobArn"]
    arn_b = b.create_optimization_job(**spec("same-name", role_b, f"s3://{OUT_B}/same-name/"))["OptimizationJobArn"]
    assert arn_a == f"arn:aws:sagemaker:us-east-1:{ACCOUNT_A}:optimization-job/same-name"
    assert arn_b == f"arn:aws:sagemaker:us-east-1:{ACCOUNT_B}:optimization-job/same-name"
    with pytest.raises(a.exceptions.ResourceInUse):  # names are unique within an account
        a.create_optimization_job(**spec("same-name", role_a, f"s3://{OUT_A}/again/"))
    a.create_optimization_job(**spec("only-a", role_a, f"s3://{OUT_A}/only-a/"))

    assert a.describe_optimization_job(OptimizationJobName="same-name")["OptimizationJobArn"] == arn_a
    assert b.describe_optimization_job(OptimizationJobName="same-name")["OptimizationJobArn"] == arn_b
    listed_b = b.list_optimization_jobs()["OptimizationJobSummaries"]
    assert [(s["OptimizationJobName"], s["OptimizationJobArn"]) for s in listed_b] == [("same-name", arn_b)]
    assert {s["OptimizationJobName"] for s in a.list_optimization_jobs()["OptimizationJobSummaries"]} == {
        "same-name",
        "only-a",
    }

    # Another account's job answers exactly as a job that does not exist.
    for operation in ("describe_optimization_job", "stop_optimization_job", "delete_optimization_job"):
        answers = []
        for name in ("only-a", "never-existed"):
            with pytest.raises(botocore.exceptions.ClientError) as caught:
                getattr(b, operation)(OptimizationJobName=name)
            error = caught.value.response["Error"]
            answers.append((error["Code"], error["Message"].replace(name, "NAME")))
        assert answers[0] == answers[1] and answers[0][0] == "ResourceNotFound", (operation, answers)
    assert a.describe_optimization_job(OptimizationJobName="only-a")["OptimizationJobStatus"] != "STOPPING"
    a.stop_optimization_job(OptimizationJobName="only-a")
    assert wait_terminal(a, "only-a", 180)["OptimizationJobStatus"] in {"STOPPED", "COMPLETED"}
    with pytest.raises(b.exceptions.ResourceNotFound):
        b.delete_optimization_job(OptimizationJobName="only-a")
    a.delete_optimization_job(OptimizationJobName="only-a")
    wait_terminal(a, "same-name", 180)
    wait_terminal(b, "same-name", 180)


def test_roles_of_other_accounts_and_unknown_roles_are_refused(setup: Setup) -> None:
    a = setup.client("team-a")
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        a.create_optimization_job(
            **spec("foreign-role", f"arn:aws:iam::{ACCOUNT_B}:role/optimizer", f"s3://{OUT_A}/x/")
        )
    error = caught.value.response["Error"]
    assert error["Code"] == "AccessDeniedException"
    assert f"arn:aws:iam::{ACCOUNT_A}:user/team-a is not authorized to perform: iam:PassRole" in error["Message"]
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        a.create_optimization_job(**spec("unknown-role", f"arn:aws:iam::{ACCOUNT_A}:role/missing", f"s3://{OUT_A}/x/"))
    error = caught.value.response["Error"]
    assert error["Code"] == "ValidationException"
    assert error["Message"].startswith(f"Could not assume role arn:aws:iam::{ACCOUNT_A}:role/missing.")
    for name in ("foreign-role", "unknown-role"):
        with pytest.raises(a.exceptions.ResourceNotFound):
            a.describe_optimization_job(OptimizationJobName=name)


def test_jobs_reach_s3_only_with_their_roles_keys(setup: Setup) -> None:
    a, b = setup.client("team-a"), setup.client("team-b")
    since = setup.s3.log_path.stat().st_size
    a.create_optimization_job(**spec("shard-ok", f"arn:aws:iam::{ACCOUNT_A}:role/optimizer", f"s3://{OUT_A}/ok/"))
    a.create_optimization_job(**spec("no-write", f"arn:aws:iam::{ACCOUNT_A}:role/read-only", f"s3://{OUT_A}/ro/"))
    b.create_optimization_job(**spec("no-read", f"arn:aws:iam::{ACCOUNT_B}:role/optimizer", f"s3://{OUT_B}/nr/"))

    assert wait_terminal(a, "shard-ok", 180)["OptimizationJobStatus"] == "COMPLETED"
    no_write = wait_terminal(a, "no-write", 180)
    no_read = wait_terminal(b, "no-read", 180)
    requests = s3_requests(setup.s3, since)

    # The role that may write completed, and every request the jobs made was signed with a role's key.
    assert {"model-rank-0-part-0.safetensors", "optjob-manifest.json"} <= {
        key.rsplit("/", 1)[-1] for key in keys(setup.s3, OUT_A, "ok/")
    }
    assert requests, "SeaweedFS logged no requests"
    assert {identity for identity, *_ in requests} <= {"role-a-optimizer", "role-a-readonly", "role-b-optimizer"}
    assert any(i == "role-a-optimizer" and m == "PUT" and p.startswith(f"/{OUT_A}/ok/") for i, m, p, _ in requests)
    assert any(i == "role-a-optimizer" and m == "GET" and p.startswith(f"/{SOURCE}/") for i, m, p, _ in requests)

    # A role that cannot write: FAILED, the S3 error in the reason, nothing left in the output.
    assert no_write["OptimizationJobStatus"] == "FAILED"
    assert "access denied" in no_write["FailureReason"].lower() and f"s3://{OUT_A}/ro/" in no_write["FailureReason"]
    assert keys(setup.s3, OUT_A, "ro/") == []
    assert setup.s3.client().list_multipart_uploads(Bucket=OUT_A, Prefix="ro/").get("Uploads", []) == []
    puts = [(path, status) for i, m, path, status in requests if i == "role-a-readonly" and m == "PUT"]
    assert puts and all(status == 403 for _, status in puts), puts  # SeaweedFS refused every write

    # A role that cannot read the source: FAILED naming the source, nothing written.
    assert no_read["OptimizationJobStatus"] == "FAILED"
    assert (
        "access denied" in no_read["FailureReason"].lower() and f"s3://{SOURCE}/tiny-llama/" in no_read["FailureReason"]
    )
    assert keys(setup.s3, OUT_B, "nr/") == []


def test_no_secret_is_written_anywhere_and_the_audit_log_records_every_call(setup: Setup) -> None:
    a, b = setup.client("team-a"), setup.client("team-b")
    a.list_optimization_jobs()
    with pytest.raises(b.exceptions.ResourceNotFound):
        b.describe_optimization_job(OptimizationJobName="audit-probe")
    with pytest.raises(botocore.exceptions.ClientError):
        setup.server.client(KEYS["team-a"][0], "wrong-secret").list_optimization_jobs()

    audit = setup.server.home / "audit.log"
    assert audit.stat().st_mode & 0o077 == 0
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert all(set(line) >= {"time", "account_id", "principal", "operation", "job_name", "outcome"} for line in lines)
    assert {
        "account_id": ACCOUNT_B,
        "principal": "team-b",
        "operation": "DescribeOptimizationJob",
        "job_name": "audit-probe",
        "outcome": "ResourceNotFound",
    }.items() <= lines[-2].items()
    assert lines[-3]["operation"] == "ListOptimizationJobs" and lines[-3]["outcome"] == "Success"
    assert lines[-3]["account_id"] == ACCOUNT_A and lines[-3]["principal"] == "team-a"
    assert lines[-1]["outcome"] == "InvalidSignatureException" and lines[-1]["account_id"] is None
    assert lines[-1]["access_key_id"] == KEYS["team-a"][0]
    created = [line for line in lines if line["operation"] == "CreateOptimizationJob"]
    assert {(line["principal"], line["outcome"]) for line in created} >= {
        ("team-a", "Success"),
        ("team-b", "Success"),
        ("team-a", "AccessDeniedException"),
    }

    # Secrets, the tenants' and the server's own: not in the store, the job logs, the server log, the
    # audit log, nor any published file.
    secrets = [*SECRETS, SERVER_SECRET, setup.s3.secret_key]
    for path in setup.server.home.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(secret.encode() in data for secret in secrets), path
    admin = setup.s3.client()
    for bucket in (OUT_A, OUT_B):
        for key in keys(setup.s3, bucket, ""):
            body = admin.get_object(Bucket=bucket, Key=key)["Body"].read()
            assert not any(secret.encode() in body for secret in secrets), key
    for client in (a, b):
        for summary in client.list_optimization_jobs()["OptimizationJobSummaries"]:
            name = summary["OptimizationJobName"]
            described = json.dumps(client.describe_optimization_job(OptimizationJobName=name), default=str)
            assert not any(secret in described for secret in secrets)


def test_aws_cli_with_a_tenant_profile(setup: Setup, tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text("[profile team-b]\nregion = us-east-1\n")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
        "AWS_CONFIG_FILE": str(config),
        "AWS_SHARED_CREDENTIALS_FILE": str(setup.credentials_file),
        "AWS_PROFILE": "team-b",
    }
    aws = Path(sys.executable).parent / "aws"
    listed = subprocess.run(
        [str(aws), "sagemaker", "list-optimization-jobs", "--endpoint-url", setup.server.url, "--output", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    arns = {s["OptimizationJobArn"] for s in json.loads(listed.stdout)["OptimizationJobSummaries"]}
    assert arns and all(f":{ACCOUNT_B}:" in arn for arn in arns)
