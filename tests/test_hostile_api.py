"""Issue #28 at the API: hostile and careless requests are bounded, refused in SageMaker's words, never a 500.

The app is the real one (``create_app`` with SigV4 and a real ``JobService`` over a store), driven
in process through Starlette's test client with requests signed by botocore; one test runs
``optjob serve`` to show that an oversized or unsigned body is refused before it is read.
"""

# Fixtures are imported from tests.support.jobs, so their parameters shadow the imports.
# ruff: noqa: F811

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from starlette.testclient import TestClient

from optjob.api.errors import ResourceLimitExceeded, ValidationException
from optjob.api.principals import Principal
from optjob.api.server import create_app
from optjob.jobs.service import JobService
from optjob.jobs.tenancy import Caller
from optjob.limits import limits
from optjob.settings import load_settings
from tests.support.jobs import home, make_request, request_wire, service, settings  # noqa: F401
from tests.support.server_process import ACCESS_KEY, SECRET_KEY, running_server

KEY, SECRET = "AKIAHOSTILE000000001", "hostile/secret"
ACCOUNT = "111111111111"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/r"


def _client(home: Path, **settings: Any) -> TestClient:
    service = JobService(load_settings(**settings), start_executor=False)
    app = create_app(lambda: service, {KEY: Principal("team-a", ACCOUNT, KEY, SECRET)})
    return TestClient(app, raise_server_exceptions=False)


def _post(client: TestClient, operation: str, body: bytes, *, region: str = "us-east-1", sign: bool = True):
    request = AWSRequest(
        method="POST",
        url="http://testserver/",
        data=body,
        headers={"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": f"SageMaker.{operation}"},
    )
    if sign:
        SigV4Auth(Credentials(KEY, SECRET), "sagemaker", region).add_auth(request)
    prepared = request.prepare()
    return client.post("/", content=body, headers=dict(prepared.headers))


def _create_body(name: str, **overrides: Any) -> bytes:
    return json.dumps(request_wire(name, RoleArn=ROLE, **overrides)).encode()


# --- item 5: regions are input; the active-job limit is the account's, across regions --------------


def test_an_unknown_region_is_a_validation_exception_not_a_500(home: Path) -> None:
    client = _client(home)
    for operation, body in [("CreateOptimizationJob", _create_body("far-job")), ("ListOptimizationJobs", b"{}")]:
        response = _post(client, operation, body, region="fake-region-1")
        assert response.status_code == 400, response.text
        assert response.json()["__type"] == "ValidationException"
        assert "'fake-region-1' is not a SageMaker region" in response.json()["message"]
    assert _post(client, "ListOptimizationJobs", b"{}", region="eu-west-1").status_code == 200


def test_the_active_job_limit_counts_the_accounts_jobs_in_every_region(home: Path) -> None:
    service = JobService(load_settings(max_active_jobs=1), start_executor=False)
    service.create(make_request("east", RoleArn=ROLE), Caller(ACCOUNT, "us-east-1", "team-a"))
    for region in ("us-west-2", "eu-west-1"):
        with pytest.raises(ResourceLimitExceeded, match="counted across regions"):
            service.create(make_request("elsewhere", RoleArn=ROLE), Caller(ACCOUNT, region, "team-a"))
    # another account still has its own limit
    service.create(
        make_request("east", RoleArn="arn:aws:iam::222222222222:role/r"), Caller("222222222222", "us-east-1")
    )


# --- item 6: bad input is a 400 in SageMaker's words, never an InternalFailure ----------------------


@pytest.mark.parametrize(
    ("body", "code", "says"),
    [
        (b"[" * 10_000 + b"]" * 10_000, "SerializationException", "deeper than"),
        (b'{"MaxResults": ' + b"7" * 4_400 + b"}", "SerializationException", "more than 4300 digits"),
        (b'{"a":' * 40 + b"1" + b"}" * 40, "SerializationException", "deeper than"),
        (b'{"MaxResults": NaN}', "SerializationException", "NaN is not a JSON value"),
        (b'{"CreationTimeAfter": 1e300}', "ValidationException", "between 0001-01-01 and 9999-12-31"),
        (b'{"CreationTimeAfter": -1e18}', "ValidationException", "between 0001-01-01 and 9999-12-31"),
        (b'{"CreationTimeBefore": "1e300"}', "ValidationException", "between 0001-01-01 and 9999-12-31"),
    ],
)
def test_deep_json_huge_integers_and_impossible_times_are_client_errors(
    home: Path, body: bytes, code: str, says: str
) -> None:
    response = _post(_client(home), "ListOptimizationJobs", body)
    assert response.status_code == 400, response.text
    assert response.json()["__type"] == code
    assert says in response.json()["message"]


# --- item 4: an output that overlaps the source is refused at Create --------------------------------


@pytest.mark.parametrize(
    ("source", "output", "relation"),
    [
        ("s3://models/tiny/", "s3://models/tiny/optimized/", "is inside"),
        ("s3://models/tiny/", "s3://models/tiny/", "is the same as"),
        ("s3://models/tiny/", "s3://models/", "contains"),
        ("s3://models/tiny.tar.gz", "s3://models/", "contains"),
    ],
)
def test_an_output_overlapping_the_source_is_refused_at_create(
    service: JobService, source: str, output: str, relation: str
) -> None:
    request = make_request("overlap", ModelSource={"S3": {"S3Uri": source}}, OutputConfig={"S3OutputLocation": output})
    with pytest.raises(ValidationException) as caught:
        service.create(request)
    assert f"OutputConfig.S3OutputLocation '{output}' {relation} the model source '{source}'" in str(caught.value)
    assert service.store.active() == []  # nothing stored, nothing downloaded


def test_outputs_beside_the_source_are_accepted(service: JobService) -> None:
    for index, output in enumerate(["s3://models/tiny2/", "s3://other/tiny/", "s3://models/tiny.tar.gz.out/"]):
        source = "s3://models/tiny.tar.gz" if output.endswith(".out/") else "s3://models/tiny/"
        service.create(
            make_request(
                f"beside-{index}", ModelSource={"S3": {"S3Uri": source}}, OutputConfig={"S3OutputLocation": output}
            )
        )


# --- item 3: the body is bounded; echoed values are cut ----------------------------------------------


def test_a_body_over_the_cap_is_refused_with_413_and_a_large_value_is_not_echoed_whole(home: Path) -> None:
    client = _client(home)
    cap = limits().api.max_body_bytes
    big = _post(client, "CreateOptimizationJob", b" " * (cap + 1))
    assert big.status_code == 413 and big.json()["__type"] == "ValidationException"
    assert str(cap) in big.json()["message"]
    # a value far past its shape's bound, under the body cap: the error repeats only the start of it
    huge_name = "a" * (cap // 2)
    response = _post(client, "CreateOptimizationJob", _create_body(huge_name))
    assert response.status_code == 400 and response.json()["__type"] == "ValidationException"
    assert len(response.content) < 2_000, len(response.content)
    assert "'" + "a" * 100 in response.json()["message"] and "...'" in response.json()["message"]


def test_many_violations_are_counted_but_not_all_listed(home: Path) -> None:
    tags = [{"Key": "", "Value": "x" * 300}] * 200  # 50 is the most, and each tag breaks two rules
    response = _post(_client(home), "CreateOptimizationJob", _create_body("tags-job", Tags=tags))
    message = response.json()["message"]
    assert response.status_code == 400 and response.json()["__type"] == "ValidationException"
    assert message.endswith("more") and message.count("failed to satisfy constraint") == 20
    assert len(message) < 20_000


def _send_headers_only(url: str, headers: dict[str, str]) -> tuple[int, float]:
    """POST headers announcing a large body, send none of it, and time the answer: a server that
    waited for the body would answer only when the socket times out."""
    host, port = url.removeprefix("http://").split(":")
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        sock.sendall(f"POST / HTTP/1.1\r\nHost: {host}:{port}\r\n{head}\r\n".encode())
        sock.settimeout(10)
        status = sock.recv(4096).split(b" ", 2)[1]
    return int(status), time.monotonic() - started


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _server_pid(port: int) -> int:
    """The ``optjob serve`` process listening on ``port`` (read from /proc; nothing is signalled)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"serve" in args and str(port).encode() in args:
                return int(entry.name)
    raise AssertionError(f"no optjob serve on port {port}")


def test_the_server_answers_an_unsigned_or_oversized_body_before_reading_it(tmp_path: Path) -> None:
    with running_server(tmp_path / "home") as server:
        announced = {"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": "SageMaker.ListOptimizationJobs"}
        status, took = _send_headers_only(server.url, {**announced, "Content-Length": str(300 * 2**20)})
        assert status == 403 and took < 5  # unsigned: refused on its headers
        signed = AWSRequest(method="POST", url=server.url + "/", data=b"{}", headers=announced)
        SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "sagemaker", "us-east-1").add_auth(signed)
        headers = {k: v for k, v in signed.prepare().headers.items() if k.lower() != "content-length"}
        status, took = _send_headers_only(server.url, {**headers, "Content-Length": str(300 * 2**20)})
        assert status == 413 and took < 5  # signed but too large: refused on its Content-Length
        # A signed 96 MiB body with no Content-Length (chunked): the server holds at most the cap of it.
        pid = _server_pid(int(server.url.rsplit(":", 1)[1]))
        before = _rss_kib(pid)

        def chunks():
            for _ in range(96):
                yield b" " * 2**20

        try:
            answer = requests.post(server.url + "/", data=chunks(), headers=headers, timeout=30)
            assert answer.status_code == 413
        except requests.ConnectionError:
            pass  # the server answered and closed while the client was still sending: also refused
        grown_mib = (_rss_kib(pid) - before) / 1024
        assert grown_mib < 32, f"the server grew {grown_mib:.0f} MiB for a refused body"


@pytest.mark.parametrize("value", [{"a": 1}, [1, 2], 2**70, True])
def test_a_forged_next_token_is_a_validation_exception(service: JobService, value: object) -> None:
    # The token format is public (base64 JSON with a hash of the filters), so a caller can forge one.
    from optjob.api.shapes import ListOptimizationJobsRequest
    from optjob.jobs.listing import _encode_token, _fingerprint

    token = _encode_token(value, "x", _fingerprint(ListOptimizationJobsRequest(), service.home.tenant))
    with pytest.raises(ValidationException, match="NextToken is not valid"):
        service.handle("ListOptimizationJobs", {"NextToken": token})


def test_a_next_token_nested_past_the_parsers_depth_is_a_validation_exception(service: JobService) -> None:
    import base64

    token = base64.urlsafe_b64encode(b"[" * 6000 + b"]" * 6000).decode().rstrip("=")
    with pytest.raises(ValidationException, match="NextToken is not valid"):
        service.handle("ListOptimizationJobs", {"NextToken": token[:8192]})
