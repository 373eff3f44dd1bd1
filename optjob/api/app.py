"""The server's app factory, configured from the environment so every uvicorn worker builds the same app.

``optjob serve`` sets these variables before starting uvicorn; they are documented in the README.
"""

from __future__ import annotations

import os

from starlette.applications import Starlette

from optjob.api.server import create_app
from optjob.api.sigv4 import load_keys

NO_AUTH_ENV = "OPTJOB_NO_AUTH"


def make_app() -> Starlette:
    from optjob.jobs.service import JobService

    no_auth = os.environ.get(NO_AUTH_ENV) == "1"
    keys = None if no_auth else load_keys()
    if keys is not None and not keys:
        raise SystemExit(
            "optjob serve: no credentials configured. Give --credentials-file (AWS credentials format), "
            "set OPTJOB_AUTH_KEYS=AKID:SECRET, or pass --no-auth for local development only."
        )
    return create_app(JobService, keys)
