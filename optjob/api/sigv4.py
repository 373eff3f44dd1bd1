"""SigV4 verification of incoming requests, using botocore's own signer for the maths.

The server rebuilds the request exactly as the client signed it (only the headers named in
``SignedHeaders``), lets ``botocore.auth.SigV4Auth`` recompute the canonical request, the string
to sign and the signature with the configured secret, and compares in constant time. Failures
use the codes AWS returns, so botocore raises what a user already knows how to read.
"""

from __future__ import annotations

import configparser
import hmac
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from optjob.api.errors import ApiError

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
class IncomingRequest:
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]  # as received, names in any case, repeats kept
    body: bytes


def load_keys(credentials_file: str | Path | None = None) -> dict[str, str]:
    """Access key id -> secret, from an AWS-credentials-format file and/or ``OPTJOB_AUTH_KEYS``.

    The file is the same INI format as ``~/.aws/credentials`` (every section's
    ``aws_access_key_id``/``aws_secret_access_key`` pair is accepted); ``OPTJOB_AUTH_KEYS`` holds
    ``AKID:SECRET`` pairs separated by commas.
    """
    keys: dict[str, str] = {}
    path = credentials_file or os.environ.get("OPTJOB_CREDENTIALS_FILE")
    if path:
        parser = configparser.ConfigParser()
        if not parser.read(path):
            raise FileNotFoundError(f"credentials file {path} cannot be read")
        for section in parser.sections():
            key_id = parser.get(section, "aws_access_key_id", fallback=None)
            secret = parser.get(section, "aws_secret_access_key", fallback=None)
            if key_id and secret:
                keys[key_id.strip()] = secret.strip()
    for pair in filter(None, (p.strip() for p in os.environ.get("OPTJOB_AUTH_KEYS", "").split(","))):
        key_id, sep, secret = pair.partition(":")
        if not sep or not key_id or not secret:
            raise ValueError("OPTJOB_AUTH_KEYS must be AKID:SECRET pairs separated by commas")
        keys[key_id] = secret
    return keys


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


def verify(request: IncomingRequest, keys: dict[str, str], *, now: datetime | None = None) -> str:
    """Check the request's SigV4 signature; return the access key id or raise an ApiError."""
    headers: dict[str, list[str]] = {}
    for name, value in request.headers:
        headers.setdefault(name.lower(), []).append(value)
    authorization = (headers.get("authorization") or [None])[0]
    if not authorization:
        raise MissingAuthenticationToken("Missing Authentication Token")
    fields = _parse_authorization(authorization)
    scope = fields["Credential"].split("/")
    if len(scope) != 5 or scope[3] != SERVICE or scope[4] != "aws4_request":
        raise IncompleteSignature(
            f"Credential should be scoped to a valid service: '{fields['Credential']}' (expected "
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
            raise InvalidSignature(f"Signed header '{name}' is missing from the request")
        # Repeated headers are signed as one comma-joined value, which is what this rebuilds.
        rebuilt.headers[name] = ",".join(headers[name])
    rebuilt.context["timestamp"] = amz_date
    signer = SigV4Auth(Credentials(key_id, secret), SERVICE, region)
    canonical = signer.canonical_request(rebuilt)
    expected = signer.signature(signer.string_to_sign(rebuilt, canonical), rebuilt)
    if not hmac.compare_digest(expected, fields["Signature"]):
        raise InvalidSignature(
            "The request signature we calculated does not match the signature you provided. Check your "
            "AWS Secret Access Key and signing method."
        )
    return key_id
