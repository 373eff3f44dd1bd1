"""The server's app factory, configured from the environment so every uvicorn worker builds the same app.

``optjob serve`` sets these variables before starting uvicorn; they are documented in docs/jobs.md and docs/api.md.
"""

from __future__ import annotations

import os
from pathlib import Path

from starlette.applications import Starlette

from optjob.api.audit import AUDIT_LOG_ENV, AuditLog
from optjob.api.principals import load_principals
from optjob.api.server import create_app
from optjob.settings import load_settings

NO_AUTH_ENV = "OPTJOB_NO_AUTH"


def make_app() -> Starlette:
    from optjob.jobs.daemon import executor_pid
    from optjob.jobs.service import JobService
    from optjob.jobs.tenancy import Caller, home_caller

    settings = load_settings()
    no_auth = os.environ.get(NO_AUTH_ENV) == "1"
    principals = None if no_auth else load_principals(settings.account_id)
    if principals is not None and not principals:
        raise SystemExit(
            "optjob serve: no credentials configured. Give --credentials-file (AWS credentials format), "
            "set OPTJOB_AUTH_KEYS=AKID:SECRET, or pass --no-auth for local development only."
        )
    audit_path = os.environ.get(AUDIT_LOG_ENV)
    home = home_caller(settings)

    def executor_running() -> bool:
        return executor_pid(settings) is not None

    return create_app(
        JobService,
        principals,
        audit=AuditLog(Path(audit_path)) if audit_path else None,
        anonymous=Caller(home.account_id, home.region, "anonymous") if no_auth else None,
        home_region=home.region,
        executor_running=executor_running,
    )
