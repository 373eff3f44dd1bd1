"""S3 URI forms the API pattern admits, and the ones it does not."""

from __future__ import annotations

import re

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError
from hypothesis import given
from hypothesis import strategies as st

from optjob.errors import InfrastructureError, InputError
from optjob.storage.s3 import storage_error
from optjob.storage.uri import S3Location, parse_s3_uri


@pytest.mark.parametrize(
    ("uri", "bucket", "key", "region"),
    [
        ("s3://models/llama/v1/", "models", "llama/v1/", None),
        ("s3://models", "models", "", None),
        ("s3://models/a b?c#d", "models", "a b?c#d", None),
        ("https://models.s3.us-west-2.amazonaws.com/llama/v1/", "models", "llama/v1/", "us-west-2"),
        ("https://models.s3.amazonaws.com/llama/model.tar.gz", "models", "llama/model.tar.gz", None),
        ("https://models.s3-eu-west-1.amazonaws.com/x", "models", "x", "eu-west-1"),
        ("https://my.dotted.bucket.s3.dualstack.us-east-1.amazonaws.com/k", "my.dotted.bucket", "k", "us-east-1"),
        ("https://s3.us-west-2.amazonaws.com/models/llama/v1/", "models", "llama/v1/", "us-west-2"),
        ("https://s3.amazonaws.com/models/k%20with%20space", "models", "k with space", None),
        ("https://s3.cn-north-1.amazonaws.com.cn/models/k", "models", "k", "cn-north-1"),
        ("https://minio.example.internal:9000/models/llama/", "models", "llama/", None),
    ],
)
def test_accepted_forms(uri: str, bucket: str, key: str, region: str | None) -> None:
    assert parse_s3_uri(uri) == S3Location(bucket, key, region)


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "models/llama",
        "http://models.s3.amazonaws.com/k",
        "ftp://models/k",
        "s3:///k",
        "s3://ab/k",
        "https://s3.us-west-2.amazonaws.com/",
        "https://models.s3.us-west-2.amazonaws.com/k?X-Amz-Signature=abc",
        "https://user:pw@s3.amazonaws.com/models/k",
        "s3://bad..bucket/k",
    ],
)
def test_rejected_forms_name_the_accepted_ones(uri: str) -> None:
    with pytest.raises(InputError, match="s3://bucket/key"):
        parse_s3_uri(uri)


def test_prefix_and_child() -> None:
    location = parse_s3_uri("s3://models/llama")
    assert location.prefix == "llama/"
    assert location.child("config.json").uri == "s3://models/llama/config.json"
    assert parse_s3_uri("s3://models/").child("a/b").key == "a/b"


@given(
    bucket=st.from_regex(r"[a-z0-9][a-z0-9-]{2,20}[a-z0-9]", fullmatch=True),
    key=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40),
)
def test_s3_scheme_round_trips(bucket: str, key: str) -> None:
    location = parse_s3_uri(f"s3://{bucket}/{key}")
    assert (location.bucket, location.key) == (bucket, key)
    assert parse_s3_uri(location.uri) == location


def _client_error(code: str, message: str = "") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message}}, "GetObject")


@pytest.mark.parametrize(
    ("exc", "category", "text"),
    [
        (_client_error("NoSuchBucket"), InputError, "bucket does not exist"),
        (_client_error("NoSuchKey"), InputError, "no such object"),
        (_client_error("AccessDenied"), InputError, "access denied.*s3:GetObject"),
        (_client_error("InvalidAccessKeyId", "bad key"), InputError, "credentials were rejected"),
        (_client_error("KMS.NotFoundException", "Key not found"), InputError, "KMS key is not usable.*KmsKeyId"),
        (_client_error("PreconditionFailed"), InfrastructureError, "changed while it was being read"),
        (_client_error("SlowDown"), InfrastructureError, "S3 answered SlowDown"),
        (EndpointConnectionError(endpoint_url="http://x"), InfrastructureError, "could not be reached"),
        (NoCredentialsError(), InfrastructureError, "no AWS credentials found"),
    ],
)
def test_storage_errors_say_who_can_fix_them(exc: Exception, category: type, text: str) -> None:
    error = storage_error(exc, "download", "s3://b/k")
    assert type(error) is category
    assert re.search(text, str(error)) and "s3://b/k" in str(error)
