"""SigV4 verification of incoming requests, using botocore's own signer for the maths.

The server rebuilds the request exactly as the client signed it (only the headers named in
``SignedHeaders``), lets ``botocore.auth.SigV4Auth`` recompute the canonical request, the string
to sign and the signature with the configured secret, and compares in constant time. Failures
use the codes AWS returns, so botocore raises what a user already knows how to read.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from optjob.api.errors import ApiError, truncate

SERVICE = "sagemaker"
MAX_SKEW_S = 300
_AUTH_PREFIX = "AWS4-HMAC-SHA256 "


class MissingAuthenticationToken(ApiError):
    code = "MissingAuthenticationTokenException"
    http_status = 403


class IncompleteSignature(ApiError):
    code = "IncompleteSignatureException"
    http_status = 400


class InvalidSignature(ApiError):
    code = "InvalidSignatureException"
    http_status = 403


class UnrecognizedClient(ApiError):
    code = "UnrecognizedClientException"
    http_status = 400


@dataclass(frozen=True)
class Signer:
    """Who signed a verified request: the access key id and the region of its credential scope."""

    access_key_id: str
    region: str


@dataclass(frozen=True)
class IncomingRequest:
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]  # as received, names in any case, repeats kept
    body: bytes


def _parse_authorization(value: str) -> dict[str, str]:
    if not value.startswith(_AUTH_PREFIX):
        raise IncompleteSignature(
            "Authorization header requires the AWS4-HMAC-SHA256 algorithm (SigV4); sign requests with "
            "botocore/boto3 or the AWS CLI"
        )
    fields: dict[str, str] = {}
    for part in value[len(_AUTH_PREFIX) :].split(","):
        name, sep, content = part.strip().partition("=")
        if sep:
            fields[name] = content
    missing = [f for f in ("Credential", "SignedHeaders", "Signature") if f not in fields]
    if missing:
        raise IncompleteSignature(f"Authorization header requires '{', '.join(missing)}' parameter(s)")
    return fields


@dataclass(frozen=True)
class _Scope:
    """What the headers alone establish: a known key, a fresh date, the fields of the signature."""

    headers: dict[str, list[str]]
    fields: dict[str, str]
    key_id: str
    secret: str
    region: str
    amz_date: str


def check_headers(
    raw_headers: list[tuple[str, str]], keys: Mapping[str, str], *, now: datetime | None = None
) -> Signer:
    """Everything about the signature that needs no body: an Authorization header, a known key, a
    fresh date. The server calls this before reading the body, so an unsigned or foreign request
    costs no more than its headers. ``verify`` still checks the signature itself."""
    scope = _scope(raw_headers, keys, now)
    return Signer(scope.key_id, scope.region)


def _scope(raw_headers: list[tuple[str, str]], keys: Mapping[str, str], now: datetime | None) -> _Scope:
    headers: dict[str, list[str]] = {}
    for name, value in raw_headers:
        headers.setdefault(name.lower(), []).append(value)
    authorization = (headers.get("authorization") or [None])[0]
    if not authorization:
        raise MissingAuthenticationToken("Missing Authentication Token")
    fields = _parse_authorization(authorization)
    scope = fields["Credential"].split("/")
    if len(scope) != 5 or scope[3] != SERVICE or scope[4] != "aws4_request":
        raise IncompleteSignature(
            f"Credential should be scoped to a valid service: '{truncate(fields['Credential'])}' (expected "
            f"AKID/date/region/{SERVICE}/aws4_request)"
        )
    key_id, date, region = scope[0], scope[1], scope[2]
    secret = keys.get(key_id)
    if secret is None:
        raise UnrecognizedClient("The security token included in the request is invalid.")

    amz_date = (headers.get("x-amz-date") or [""])[0]
    try:
        signed_at = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        raise IncompleteSignature("Authorization requires a valid X-Amz-Date header (YYYYMMDDTHHMMSSZ)") from None
    now = now or datetime.now(UTC)
    if abs((now - signed_at).total_seconds()) > MAX_SKEW_S:
        raise InvalidSignature(
            f"Signature expired: {amz_date} is now earlier than {(now.timestamp() - MAX_SKEW_S):.0f} "
            f"or later than {(now.timestamp() + MAX_SKEW_S):.0f} (more than 5 minutes of clock skew)"
        )
    if date != amz_date[:8]:
        raise InvalidSignature("Credential date does not match X-Amz-Date")
    return _Scope(headers, fields, key_id, secret, region, amz_date)


def verify(request: IncomingRequest, keys: Mapping[str, str], *, now: datetime | None = None) -> Signer:
    """Check the request's SigV4 signature against ``keys`` (access key id -> secret).

    Returns who signed it, or raises an ApiError with AWS's code."""
    scope = _scope(request.headers, keys, now)
    headers, fields = scope.headers, scope.fields
    signed_names = fields["SignedHeaders"].split(";")
    if "host" not in signed_names:
        raise InvalidSignature("'Host' must be a signed header")
    rebuilt = AWSRequest(
        method=request.method,
        url=f"http://{headers.get('host', [''])[0]}{request.path}" + (f"?{request.query}" if request.query else ""),
        data=request.body,
    )
    for name in signed_names:
        if name not in headers:
            raise InvalidSignature(f"Signed header '{truncate(name)}' is missing from the request")
        # Repeated headers are signed as one comma-joined value, which is what this rebuilds.
        rebuilt.headers[name] = ",".join(headers[name])
    rebuilt.context["timestamp"] = scope.amz_date
    signer = SigV4Auth(Credentials(scope.key_id, scope.secret), SERVICE, scope.region)
    try:
        canonical = signer.canonical_request(rebuilt)
        expected = signer.signature(signer.string_to_sign(rebuilt, canonical), rebuilt)
    except (ValueError, UnicodeError):  # a Host or path no client could have signed
        raise IncompleteSignature("The request's Host, path or signed headers cannot be canonicalized") from None
    # bytes, not str: compare_digest refuses non-ASCII strings, and the header is the caller's
    if not hmac.compare_digest(expected.encode(), fields["Signature"].encode("utf-8", "replace")):
        raise InvalidSignature(
            "The request signature we calculated does not match the signature you provided. Check your "
            "AWS Secret Access Key and signing method."
        )
    return Signer(scope.key_id, scope.region)
