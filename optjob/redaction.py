"""Secret-looking values out of what optjob writes for others to read: manifests and job logs.

A request's OptimizationEnvironment and OverrideEnvironment are the caller's to fill, and people
put tokens and keys there; the published ``optjob-manifest.json`` is read by whoever can read the
output prefix, and a job's log by whoever operates the server. Both keep every variable's name
and redact the value when the name says it is a secret (``AWS_SECRET_ACCESS_KEY``, ``HF_TOKEN``)
or the value looks like one whatever its name (an access key id, a PEM private key). The rules
are data (``configs/limits.yaml`` ``redaction``). The job itself still gets the real values.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import cache
from typing import Any

from optjob.limits import limits

REDACTED = "***redacted***"
# Keys whose values are environment-variable maps in a manifest (a stage's env, a plan's stages).
_ENV_KEYS = frozenset({"env", "environment", "optimization_environment", "override_environment"})


@cache
def _name_pattern() -> re.Pattern[str]:
    words = "|".join(re.escape(word) for word in limits().redaction.secret_name_words)
    return re.compile(rf"(?:^|_)(?:{words})(?:_|$)", re.IGNORECASE)


@cache
def _value_pattern() -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{p})" for p in limits().redaction.secret_value_patterns))


@cache
def _assignment_pattern() -> re.Pattern[str]:
    # NAME=value or NAME: value in free text, where NAME is a secret's name
    return re.compile(r"\b([A-Za-z_][A-Za-z0-9_]*)(\s*[=:]\s*)(['\"]?)([^\s'\",;]+)")


def is_secret_name(name: str) -> bool:
    return bool(_name_pattern().search(name))


def redact_env(env: Mapping[str, Any]) -> dict[str, Any]:
    """``env`` with the values of secret-named variables, and secret-looking values, redacted."""
    return {
        key: REDACTED if is_secret_name(str(key)) and value not in (None, "") else redact_text(value)
        for key, value in env.items()
    }


def redact_text(value: Any) -> Any:
    """A string with secret-looking values and ``SECRET_NAME=value`` assignments redacted; other
    values as they are."""
    if not isinstance(value, str):
        return value

    def assignment(match: re.Match[str]) -> str:
        if not is_secret_name(match.group(1)):
            return match.group(0)
        return f"{match.group(1)}{match.group(2)}{match.group(3)}{REDACTED}"

    return _assignment_pattern().sub(assignment, _value_pattern().sub(REDACTED, value))


def redact_tree(data: Any) -> Any:
    """JSON-like ``data`` (a manifest) with every environment map redacted (``redact_env``) and every
    other string passed through ``redact_text``."""
    if isinstance(data, Mapping):
        return {
            key: redact_env(value) if key in _ENV_KEYS and isinstance(value, Mapping) else redact_tree(value)
            for key, value in data.items()
        }
    if isinstance(data, list | tuple):
        return [redact_tree(item) for item in data]
    return redact_text(data)
