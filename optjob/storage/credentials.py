"""A job's S3 credentials: its execution role's, never optjob's own.

Where they come from is decided when the job is created and recorded with it (``role_source``):

* ``ambient``: the standard AWS chain of the process (single-tenant; RoleArn is recorded only);
* ``roles-file:PATH``: the role's keys from an INI file whose sections are role ARNs, for
  S3-compatible stores without STS (SeaweedFS, MinIO, Ceph identities);
* ``sts``: ``sts:AssumeRole`` on RoleArn with the job's name as the session name, through
  botocore's own assume-role fetcher, so the temporary credentials refresh themselves before they
  expire during a long job. Only the STS call is signed with optjob's credentials.

Secrets live only in memory here: nothing in this module writes or logs a key.
"""

from __future__ import annotations

import re
from pathlib import Path

import botocore.session
from botocore.credentials import (
    AssumeRoleCredentialFetcher,
    CredentialProvider,
    CredentialResolver,
    Credentials,
    DeferredRefreshableCredentials,
)
from botocore.exceptions import BotoCoreError, ClientError

from optjob.errors import InfrastructureError, InputError
from optjob.secret_files import SecretFileError, read_private_ini

AMBIENT = "ambient"
STS = "sts"
ROLES_FILE_PREFIX = "roles-file:"
# Variables through which the standard chain would hand optjob's own keys to anything a job starts.
AMBIENT_CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
)
_SESSION_NAME = re.compile(r"[^\w+=,.@-]")


def roles_in_file(path: str | Path) -> frozenset[str]:
    """The role ARNs a roles file holds keys for (the file's mode is checked, keys are not kept)."""
    parser = read_private_ini(path, "roles file")
    return frozenset(section for section in parser.sections() if parser.has_option(section, "aws_access_key_id"))


def _from_roles_file(path: str, role_arn: str) -> Credentials:
    try:
        parser = read_private_ini(path, "roles file")
    except SecretFileError as exc:
        raise InfrastructureError(f"Cannot get the credentials of {role_arn}: {exc}.") from None
    if not parser.has_section(role_arn):
        raise InputError(
            f"Could not assume role {role_arn}: the optjob server's roles file {path} has no section for it. "
            "Ask the optjob operator to add the role's keys, or run the job with a role the file holds."
        )
    section = parser[role_arn]
    key_id = section.get("aws_access_key_id", "").strip()
    secret = section.get("aws_secret_access_key", "").strip()
    if not key_id or not secret:
        raise InfrastructureError(
            f"Cannot get the credentials of {role_arn}: its section in the roles file {path} needs both "
            "aws_access_key_id and aws_secret_access_key. Fix the roles file."
        )
    return Credentials(key_id, secret, section.get("aws_session_token", "").strip() or None, method="optjob-roles-file")


def _assumed(role_arn: str, session_name: str) -> Credentials:
    base = botocore.session.get_session()
    source = base.get_credentials()
    if source is None:
        raise InfrastructureError(
            f"Cannot assume {role_arn}: optjob has no AWS credentials of its own to call sts:AssumeRole with. "
            "Configure the standard AWS credential chain for the optjob server."
        )
    fetcher = AssumeRoleCredentialFetcher(
        client_creator=base.create_client,
        source_credentials=source,
        role_arn=role_arn,
        extra_args={"RoleSessionName": _SESSION_NAME.sub("-", session_name)[:64]},
    )
    credentials = DeferredRefreshableCredentials(refresh_using=fetcher.fetch_credentials, method="assume-role")
    try:
        credentials.get_frozen_credentials()  # assume now: a refusal is the job's reason, not a later S3 error
    except ClientError as exc:
        error = exc.response.get("Error", {})
        raise InputError(
            f"Could not assume role {role_arn}: STS answered {error.get('Code', 'an error')}: "
            f"{error.get('Message', exc)}. Make the role's trust policy allow optjob's principal to assume it."
        ) from None
    except (BotoCoreError, OSError) as exc:
        raise InfrastructureError(f"Could not assume role {role_arn}: STS could not be reached ({exc}).") from None
    return credentials


def job_credentials(role_source: str, role_arn: str, session_name: str) -> Credentials | None:
    """The credentials S3 clients of this job use; None means the standard chain (ambient)."""
    if role_source == AMBIENT:
        return None
    if role_source == STS:
        return _assumed(role_arn, session_name)
    if role_source.startswith(ROLES_FILE_PREFIX):
        return _from_roles_file(role_source[len(ROLES_FILE_PREFIX) :], role_arn)
    raise InfrastructureError(f"The job records an unknown credentials source '{role_source}'; upgrade optjob.")


class _Given(CredentialProvider):
    METHOD = "optjob-job-role"

    def __init__(self, credentials: Credentials) -> None:
        super().__init__()
        self._credentials = credentials

    def load(self) -> Credentials:
        return self._credentials


def session_with(credentials: Credentials | None) -> botocore.session.Session:
    """A botocore session whose credential chain is exactly ``credentials`` (or the standard one)."""
    session = botocore.session.get_session()
    if credentials is not None:
        session.register_component("credential_provider", CredentialResolver([_Given(credentials)]))
    return session
