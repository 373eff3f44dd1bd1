"""S3 clients and transfer tuning, configured the standard AWS way.

Endpoint, region, credentials and addressing style come from boto3's own chain (environment,
``AWS_CONFIG_FILE``, instance roles): ``AWS_ENDPOINT_URL_S3`` points us at an S3-compatible store
exactly as it points the AWS CLI there, so we add no variables of our own for things boto3 already
names. ``S3Settings`` holds only what the AWS config cannot say: how parallel and how large the
transfers are, where downloaded models are cached, and, for a job with an execution role, that
role's credentials (``optjob.storage.credentials``), which then replace the standard chain.
Retry mode and attempts default to the AWS config (``AWS_RETRY_MODE``, ``AWS_MAX_ATTEMPTS``),
upgrading botocore's 'legacy' default to 'standard' because model transfers are long and must
survive dropped connections.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import boto3
import botocore.session
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from pydantic import BaseModel, ConfigDict, Field
from s3transfer.exceptions import RetriesExceededError

from optjob.errors import InfrastructureError, InputError, JobFailed
from optjob.storage.credentials import session_with

MiB = 1024 * 1024
S3Client = Any  # boto3's S3 client is generated at run time; there is no importable class to name.
_DEFAULT_ATTEMPTS = 5


class S3Settings(BaseModel):
    """Transfer tuning. Endpoint, region, credentials and addressing come from the AWS config."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    max_concurrency: int = Field(10, ge=1, le=256, description="parallel requests per transfer batch")
    multipart_threshold: int = Field(16 * MiB, ge=1, description="files this large move in parts")
    multipart_chunksize: int = Field(16 * MiB, ge=5 * MiB, description="part size (S3 minimum 5 MiB)")
    retry_mode: Literal["standard", "adaptive"] | None = Field(
        None, description="botocore retry mode; None reads AWS_RETRY_MODE / the AWS config, else standard"
    )
    max_attempts: int | None = Field(
        None, ge=1, le=50, description="attempts per request; None reads AWS_MAX_ATTEMPTS / the AWS config"
    )
    connect_timeout_s: float = Field(10.0, gt=0)
    read_timeout_s: float = Field(60.0, gt=0)
    addressing_style: Literal["auto", "virtual", "path"] | None = Field(
        None, description="None leaves it to the AWS config file (s3.addressing_style)"
    )
    cache_dir: Path | None = Field(None, description="downloaded-model cache; None disables caching")
    credentials: Credentials | None = Field(
        None, exclude=True, repr=False, description="the job role's credentials; None: the standard AWS chain"
    )


def _retry_policy(settings: S3Settings, session: botocore.session.Session) -> tuple[str, int]:
    mode = settings.retry_mode or session.get_config_variable("retry_mode") or "standard"
    if mode not in ("standard", "adaptive"):
        mode = "standard"
    attempts = settings.max_attempts or session.get_config_variable("max_attempts") or _DEFAULT_ATTEMPTS
    return mode, int(attempts)


def make_client(settings: S3Settings | None = None) -> S3Client:
    """An S3 client from the standard AWS chain with our retry, pool and timeout tuning."""
    settings = settings or S3Settings()
    core = session_with(settings.credentials)
    session = boto3.session.Session(botocore_session=core)
    mode, attempts = _retry_policy(settings, core)
    config = Config(
        retries={"mode": mode, "total_max_attempts": attempts},
        max_pool_connections=settings.max_concurrency + 4,
        connect_timeout=settings.connect_timeout_s,
        read_timeout=settings.read_timeout_s,
        tcp_keepalive=True,
        s3={"addressing_style": settings.addressing_style} if settings.addressing_style else None,
    )
    # AWS_REGION is the cross-SDK name (the AWS CLI v2 lets it override AWS_DEFAULT_REGION and the
    # profile); botocore itself reads only AWS_DEFAULT_REGION, so honour it here.
    region = os.environ.get("AWS_REGION") or None
    return session.client("s3", config=config, region_name=region)


def transfer_config(settings: S3Settings, client: S3Client | None = None) -> TransferConfig:
    """s3transfer tuning: threads, multipart sizes, and download attempts matching the client's."""
    attempts = settings.max_attempts or _DEFAULT_ATTEMPTS
    if client is not None:
        attempts = client.meta.config.retries.get("total_max_attempts", attempts)
    return TransferConfig(
        multipart_threshold=settings.multipart_threshold,
        multipart_chunksize=settings.multipart_chunksize,
        max_concurrency=settings.max_concurrency,
        num_download_attempts=attempts,
        use_threads=True,
        preferred_transfer_client="classic",
    )


def _short(text: object, limit: int = 300) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_DENIED = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "AccountProblem"}
_BAD_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}


def storage_error(exc: BaseException, action: str, uri: str) -> JobFailed:
    """Translate a boto/s3transfer exception into the job failure a person can act on.

    Input errors (missing bucket or object, access denied, unusable KMS key) fail the same way when
    retried; connection trouble that outlived the retries is infrastructure and may pass next time.
    """
    if isinstance(exc, JobFailed):
        return exc
    if isinstance(exc, RetriesExceededError) and exc.last_exception is not None:
        exc = exc.last_exception
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        message = _short(error.get("Message") or exc)
        if code == "NoSuchBucket":
            return InputError(f"Cannot {action} {uri}: the bucket does not exist. Check the S3 URI.")
        if code in _NOT_FOUND:
            return InputError(f"Cannot {action} {uri}: no such object. Check the S3 URI.")
        if code in _DENIED:
            return InputError(
                f"Cannot {action} {uri}: access denied ({code}). Grant the job's role the S3 "
                "permissions it needs (s3:ListBucket, s3:GetObject, s3:PutObject, s3:DeleteObject, "
                "s3:AbortMultipartUpload) and kms:Decrypt/kms:GenerateDataKey for encrypted data."
            )
        if code in _BAD_CREDENTIALS:
            return InputError(f"Cannot {action} {uri}: the AWS credentials were rejected ({code}): {message}")
        if code.startswith("KMS") or "kms" in message.lower():
            return InputError(
                f"Cannot {action} {uri}: the KMS key is not usable ({code}: {message}). "
                "Check OutputConfig.KmsKeyId and the key policy."
            )
        if code in ("PreconditionFailed", "412"):
            return InfrastructureError(
                f"Cannot {action} {uri}: the object changed while it was being read (its ETag no longer "
                "matches). Retry the job once the source is no longer being written."
            )
        return InfrastructureError(f"Cannot {action} {uri}: S3 answered {code}: {message}")
    if isinstance(exc, NoCredentialsError):
        return InfrastructureError(
            f"Cannot {action} {uri}: no AWS credentials found. Configure the standard AWS credential "
            "chain (environment, AWS_CONFIG_FILE/AWS_SHARED_CREDENTIALS_FILE, or an instance role)."
        )
    if isinstance(exc, BotoCoreError | OSError | RetriesExceededError):
        return InfrastructureError(
            f"Cannot {action} {uri}: the S3 endpoint could not be reached reliably after retries "
            f"({type(exc).__name__}: {_short(exc)})."
        )
    return InfrastructureError(f"Cannot {action} {uri}: {type(exc).__name__}: {_short(exc)}")
