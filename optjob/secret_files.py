"""Files that hold keys: refused when other users of the host can read them, as ssh refuses its keys.

Both the server's credentials file (who may call) and its roles file (what each job's role may
reach) are INI files in ``~/.aws/credentials`` form. A copy readable by the group or by everyone
hands every account's keys to anyone with a shell on the host, so it is not loaded at all.
"""

from __future__ import annotations

import configparser
import os
import stat
from pathlib import Path


class SecretFileError(ValueError):
    """The file cannot be used; the message says how to fix it."""


def read_private_ini(path: str | Path, what: str) -> configparser.ConfigParser:
    """Parse ``path`` after checking that only its owner can read or write it."""
    path = Path(path)
    try:
        info = path.stat()
    except OSError as exc:
        raise SecretFileError(f"{what} {path} cannot be read: {exc.strerror}") from None
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise SecretFileError(
            f"{what} {path} is accessible by other users of this host (mode {mode:04o}); it holds secret "
            f"keys, so it is refused. Run: chmod 600 {path}"
        )
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise SecretFileError(
            f"{what} {path} belongs to another user (uid {info.st_uid}); it must be owned by the user "
            f"optjob runs as. Run: chown {os.getuid()} {path}"
        )
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(path, encoding="utf-8")
    except configparser.Error as exc:
        raise SecretFileError(f"{what} {path} is not a valid INI file: {str(exc).splitlines()[0]}") from None
    return parser
