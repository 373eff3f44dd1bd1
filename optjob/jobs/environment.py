"""The environment of a process optjob starts: ours, pinned to this data directory, with optjob importable."""

from __future__ import annotations

import os
from pathlib import Path

import optjob
from optjob.api.principals import AUTH_KEYS_ENV
from optjob.jobs.store import JobRecord
from optjob.settings import Settings
from optjob.storage.credentials import AMBIENT_CREDENTIAL_VARIABLES, ROLES_FILE_PREFIX


def worker_environment(settings: Settings, job: JobRecord | None = None) -> dict[str, str]:
    """For a job's worker (``job`` given) the server's API keys are left out, and so are optjob's
    own AWS credentials when the job's role keys come from a roles file: a job's process never
    holds what it has no use for. (With STS the worker needs them for sts:AssumeRole alone, and
    drops them once it holds the role's credentials.)
    """
    env = dict(os.environ)
    if job is not None:
        env.pop(AUTH_KEYS_ENV, None)
        if job.role_source.startswith(ROLES_FILE_PREFIX):
            for variable in AMBIENT_CREDENTIAL_VARIABLES:
                env.pop(variable, None)
    env["OPTJOB_HOME"] = str(settings.home)
    root = str(Path(optjob.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env
