"""The HTTP endpoint, driven over real HTTP by boto3 and the AWS CLI exactly as users run them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from unittest import mock

import botocore.exceptions
import pytest
import requests
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from tests.support.server_process import ACCESS_KEY, SECRET_KEY, Server, running_server, wait_terminal

EXAMPLE = Path(__file__).resolve().parent.parent / "configs" / "examples" / "neuron-compile-inf2-48xlarge.json"


def spec(name: str) -> dict:
    request = json.loads(EXAMPLE.read_text())
    request["OptimizationJobName"] = name
    # a plain bucket: this spec's own jumpstart-private-cache source is gated, which is not what we test here
    request["ModelSource"] = {"S3": {"S3Uri": "s3://models/llama/"}}
    return request


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    # Jobs really start on the server's executor; the deliberately slow first step keeps each one
    # INPROGRESS long enough that Stop is always valid, so the tests are deterministic.
    with running_server(tmp_path_factory.mktemp("home"), extra_env={"OPTJOB_DEBUG_DELAY_SECONDS": "120"}) as running:
        yield running


def test_five_operations_through_boto3(server: Server) -> None:
    client = server.client()
    arn = client.create_optimization_job(**spec("boto-job-1"))["OptimizationJobArn"]
    assert arn == "arn:aws:sagemaker:us-east-1:000000000000:optimization-job/boto-job-1"
    described = client.describe_optimization_job(OptimizationJobName="boto-job-1")
    assert described["OptimizationJobName"] == "boto-job-1"
    assert described["OptimizationJobStatus"] in {"STARTING", "INPROGRESS"}
    assert described["CreationTime"].tzinfo is not None
    assert described["ResponseMetadata"]["HTTPHeaders"]["content-type"] == "application/x-amz-json-1.1"
    assert described["ResponseMetadata"]["RequestId"]
    assert "Tags" not in described
    listed = client.list_optimization_jobs(NameContains="boto-job")["OptimizationJobSummaries"]
    assert [s["OptimizationJobName"] for s in listed] == ["boto-job-1"]
    assert listed[0]["OptimizationTypes"] == ["Compilation"]
    client.stop_optimization_job(OptimizationJobName="boto-job-1")
    assert client.describe_optimization_job(OptimizationJobName="boto-job-1")["OptimizationJobStatus"] in {
        "STOPPING",
        "STOPPED",
    }
    assert wait_terminal(client, "boto-job-1")["OptimizationJobStatus"] == "STOPPED"
    with pytest.raises(botocore.exceptions.ClientError) as again:
        client.stop_optimization_job(OptimizationJobName="boto-job-1")
    assert again.value.response["Error"]["Code"] == "ValidationException"
    client.delete_optimization_job(OptimizationJobName="boto-job-1")
    with pytest.raises(client.exceptions.ResourceNotFound):
        client.describe_optimization_job(OptimizationJobName="boto-job-1")


def test_botocore_raises_the_modelled_exceptions(server: Server) -> None:
    client = server.client()
    client.create_optimization_job(**spec("dup-job"))
    with pytest.raises(client.exceptions.ResourceInUse):
        client.create_optimization_job(**spec("dup-job"))
    with pytest.raises(client.exceptions.ResourceNotFound):
        client.stop_optimization_job(OptimizationJobName="no-such-job")
    with pytest.raises(client.exceptions.ResourceNotFound):
        client.delete_optimization_job(OptimizationJobName="no-such-job")
    bad = spec("bad-job")
    bad["DeploymentInstanceType"] = "ml.g6.13xlarge"
    bad["StoppingCondition"] = {"MaxPendingTimeInSeconds": 5}
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        client.create_optimization_job(**bad)
    error = caught.value.response["Error"]
    assert error["Code"] == "ValidationException"
    assert error["Message"].startswith(
        "2 validation errors detected: Value 'ml.g6.13xlarge' at 'deploymentInstanceType'"
    )
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    with pytest.raises(client.exceptions.ResourceNotFound):
        client.describe_optimization_job(OptimizationJobName="bad-job")


def test_paginator_walks_every_job_once(server: Server) -> None:
    client = server.client()
    for index in range(7):
        client.create_optimization_job(**spec(f"page-job-{index}"))
    pages = list(
        client.get_paginator("list_optimization_jobs").paginate(
            NameContains="page-job", SortBy="Name", SortOrder="Ascending", PaginationConfig={"PageSize": 3}
        )
    )
    names = [s["OptimizationJobName"] for page in pages for s in page["OptimizationJobSummaries"]]
    assert names == [f"page-job-{i}" for i in range(7)]
    assert [len(p["OptimizationJobSummaries"]) for p in pages] == [3, 3, 1]


def _raw_post(
    server: Server, body: bytes, target: str, *, sign_with: tuple[str, str] | None, amz_date: str | None = None
):
    request = AWSRequest(
        method="POST",
        url=server.url + "/",
        data=body,
        headers={"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": target},
    )
    if sign_with:
        signer = SigV4Auth(Credentials(*sign_with), "sagemaker", "us-east-1")
        if amz_date:  # sign as if the client's clock were at amz_date
            frozen = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
            with mock.patch("botocore.auth.get_current_datetime", return_value=frozen):
                signer.add_auth(request)
        else:
            signer.add_auth(request)
    prepared = request.prepare()
    return requests.post(prepared.url, data=prepared.body, headers=dict(prepared.headers), timeout=10)


def test_unsigned_and_badly_signed_requests_are_refused_and_change_nothing(server: Server) -> None:
    body = json.dumps(spec("sneaky-job")).encode()
    target = "SageMaker.CreateOptimizationJob"
    cases = {
        "MissingAuthenticationTokenException": _raw_post(server, body, target, sign_with=None),
        "UnrecognizedClientException": _raw_post(server, body, target, sign_with=("AKIAUNKNOWN000000000", SECRET_KEY)),
        "InvalidSignatureException": _raw_post(server, body, target, sign_with=(ACCESS_KEY, "wrong-secret")),
    }
    expired = _raw_post(server, body, target, sign_with=(ACCESS_KEY, SECRET_KEY), amz_date="20200101T000000Z")
    for code, response in [*cases.items(), ("InvalidSignatureException", expired)]:
        assert response.status_code in (400, 403), response.text
        assert response.json()["__type"] == code, response.text
        assert response.headers["x-amzn-RequestId"]
    assert "expired" in expired.json()["message"]
    # a body tampered with after signing
    request = AWSRequest(
        method="POST",
        url=server.url + "/",
        data=body,
        headers={"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": target},
    )
    SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "sagemaker", "us-east-1").add_auth(request)
    prepared = request.prepare()
    tampered = requests.post(
        prepared.url, data=body.replace(b"sneaky-job", b"sneaky-jo2"), headers=dict(prepared.headers), timeout=10
    )
    assert tampered.json()["__type"] == "InvalidSignatureException"
    with pytest.raises(server.client().exceptions.ResourceNotFound):
        server.client().describe_optimization_job(OptimizationJobName="sneaky-job")
    # and a signed stop of an existing job with a wrong key leaves it alone
    server.client().create_optimization_job(**spec("victim-job"))
    before = server.client().describe_optimization_job(OptimizationJobName="victim-job")["LastModifiedTime"]
    refused = _raw_post(
        server,
        b'{"OptimizationJobName": "victim-job"}',
        "SageMaker.DeleteOptimizationJob",
        sign_with=(ACCESS_KEY, "wrong-secret"),
    )
    assert refused.json()["__type"] == "InvalidSignatureException"
    after = server.client().describe_optimization_job(OptimizationJobName="victim-job")
    assert after["LastModifiedTime"] >= before


def test_malformed_body_and_unknown_operation(server: Server) -> None:
    bad_json = _raw_post(server, b"{not json", "SageMaker.ListOptimizationJobs", sign_with=(ACCESS_KEY, SECRET_KEY))
    assert bad_json.status_code == 400
    assert bad_json.json()["__type"] == "SerializationException"
    unknown = _raw_post(server, b"{}", "SageMaker.CreateTrainingJob", sign_with=(ACCESS_KEY, SECRET_KEY))
    assert unknown.status_code == 400
    assert unknown.json()["__type"] == "UnknownOperationException"
    assert "SageMaker.CreateOptimizationJob" in unknown.json()["message"]


def _aws(server: Server, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    }
    aws = Path(sys.executable).parent / "aws"
    return subprocess.run(
        [str(aws), "sagemaker", *args, "--endpoint-url", server.url, "--output", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_aws_cli_works_unchanged(server: Server, tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec("cli-job-1")))
    created = _aws(server, "create-optimization-job", "--cli-input-json", f"file://{spec_file}")
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["OptimizationJobArn"].endswith("optimization-job/cli-job-1")
    spec_file.write_text(json.dumps(spec("cli-job-2")))
    assert _aws(server, "create-optimization-job", "--cli-input-json", f"file://{spec_file}").returncode == 0
    described = _aws(server, "describe-optimization-job", "--optimization-job-name", "cli-job-1")
    assert described.returncode == 0, described.stderr
    assert json.loads(described.stdout)["DeploymentInstanceType"] == "ml.inf2.48xlarge"
    listed = _aws(server, "list-optimization-jobs", "--name-contains", "cli-job", "--max-items", "1")
    assert listed.returncode == 0, listed.stderr
    page = json.loads(listed.stdout)
    assert len(page["OptimizationJobSummaries"]) == 1 and page["NextToken"]
    for name in ("cli-job-1", "cli-job-2"):
        stopped = _aws(server, "stop-optimization-job", "--optimization-job-name", name)
        assert stopped.returncode == 0, stopped.stderr
        assert wait_terminal(server.client(), name)["OptimizationJobStatus"] == "STOPPED"
        deleted = _aws(server, "delete-optimization-job", "--optimization-job-name", name)
        assert deleted.returncode == 0, deleted.stderr
    missing = _aws(server, "describe-optimization-job", "--optimization-job-name", "cli-job-1")
    assert missing.returncode != 0 and "ResourceNotFound" in missing.stderr
