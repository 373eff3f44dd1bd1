"""Who may call the server, and which account each caller belongs to.

The credentials file is the ``~/.aws/credentials`` format: each section is a principal (its name
is the section's), with ``aws_access_key_id``/``aws_secret_access_key`` and, optionally,
``aws_account_id`` (12 digits; the key botocore itself reads for account-based endpoints). A key
without an account belongs to the home account, so a single-tenant file keeps working unchanged.
``optjob_console = read-write`` lets a principal stop and delete jobs from the web console, which is
read-only for everyone else (the API's rights are the same either way).
``OPTJOB_AUTH_KEYS=AKID:SECRET,...`` adds home-account keys named by their key id. The file is
refused when other users of the host can read it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from optjob.secret_files import SecretFileError, read_private_ini

CREDENTIALS_FILE_ENV = "OPTJOB_CREDENTIALS_FILE"
AUTH_KEYS_ENV = "OPTJOB_AUTH_KEYS"
CONSOLE_ACCESS_KEY = "optjob_console"
_ACCOUNT = re.compile(r"^\d{12}$")


@dataclass(frozen=True)
class Principal:
    """One access key: whose it is and which account it acts for. ``repr`` never shows the secret."""

    name: str
    account_id: str
    access_key_id: str
    secret_access_key: str = field(repr=False)
    console_write: bool = False  # may stop and delete jobs from the web console (optjob_console = read-write)


def load_principals(home_account: str, credentials_file: str | Path | None = None) -> dict[str, Principal]:
    """Access key id -> principal, from the credentials file and ``OPTJOB_AUTH_KEYS``."""
    principals: dict[str, Principal] = {}
    path = credentials_file or os.environ.get(CREDENTIALS_FILE_ENV)
    if path:
        parser = read_private_ini(path, "credentials file")
        for section in parser.sections():
            key_id = parser.get(section, "aws_access_key_id", fallback="").strip()
            secret = parser.get(section, "aws_secret_access_key", fallback="").strip()
            if not key_id or not secret:
                continue
            account = parser.get(section, "aws_account_id", fallback="").strip() or home_account
            if not _ACCOUNT.match(account):
                raise SecretFileError(
                    f"credentials file {path}: section [{section}] has aws_account_id '{account}'; an account "
                    "id is 12 digits, e.g. aws_account_id = 111122223333"
                )
            if key_id in principals:
                raise SecretFileError(
                    f"credentials file {path}: access key {key_id} appears in [{principals[key_id].name}] and "
                    f"[{section}]; each key belongs to one principal"
                )
            console = parser.get(section, CONSOLE_ACCESS_KEY, fallback="read-only").strip()
            if console not in ("read-only", "read-write"):
                raise SecretFileError(
                    f"credentials file {path}: section [{section}] has {CONSOLE_ACCESS_KEY} = '{console}'; "
                    "use read-only (the default) or read-write"
                )
            principals[key_id] = Principal(section, account, key_id, secret, console_write=console == "read-write")
    for pair in filter(None, (p.strip() for p in os.environ.get(AUTH_KEYS_ENV, "").split(","))):
        key_id, sep, secret = pair.partition(":")
        if not sep or not key_id or not secret:
            raise ValueError(f"{AUTH_KEYS_ENV} must be AKID:SECRET pairs separated by commas")
        principals[key_id] = Principal(key_id, home_account, key_id, secret)
    return principals


def accounts(principals: dict[str, Principal]) -> set[str]:
    return {principal.account_id for principal in principals.values()}
