"""``optjob serve``: the SageMaker-compatible HTTP endpoint that boto3 and the AWS CLI use unchanged."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from optjob.api.app import NO_AUTH_ENV
from optjob.api.sigv4 import load_keys
from optjob.cli import app
from optjob.jobs.daemon import hosted_executor
from optjob.settings import load_settings


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind. Anything but loopback exposes the API.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8080,
    workers: Annotated[int, typer.Option(min=1, help="HTTP worker processes (uvicorn).")] = 1,
    credentials_file: Annotated[
        Path | None,
        typer.Option(
            help="Access keys accepted for SigV4, in ~/.aws/credentials format (every section's "
            "aws_access_key_id/aws_secret_access_key). OPTJOB_AUTH_KEYS=AKID:SECRET,... also works.",
        ),
    ] = None,
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="Accept unsigned requests. Local development only.")
    ] = False,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "warning",
) -> None:
    """Serve CreateOptimizationJob and friends over AWS JSON 1.1 with SigV4 authentication.

    Point boto3 at it with boto3.client("sagemaker", endpoint_url="http://HOST:PORT") or the AWS CLI
    with --endpoint-url; nothing else changes. Jobs created here run on this host's executor.
    """
    import uvicorn

    console = Console(stderr=True)
    if credentials_file is not None:
        os.environ["OPTJOB_CREDENTIALS_FILE"] = str(credentials_file)
    if no_auth:
        os.environ[NO_AUTH_ENV] = "1"
        console.print(
            "WARNING: --no-auth: requests are NOT authenticated. Anyone who can reach "
            f"{host}:{port} can create, stop and delete jobs. Use for local development only.",
            style="bold red",
            markup=False,
        )
    else:
        os.environ.pop(NO_AUTH_ENV, None)
        keys = load_keys()
        if not keys:
            console.print(
                "optjob serve: no credentials configured. Give --credentials-file, set "
                "OPTJOB_AUTH_KEYS=AKID:SECRET, or pass --no-auth for local development only.",
                style="red",
                markup=False,
            )
            raise typer.Exit(2)
    url = f"http://{host}:{port}"
    console.print(
        f"optjob serving the SageMaker optimization-job API at {url}\n"
        f'  boto3:   boto3.client("sagemaker", endpoint_url="{url}")\n'
        f"  AWS CLI: aws sagemaker list-optimization-jobs --endpoint-url {url}",
        markup=False,
        highlight=False,
    )
    # The executor that runs jobs created over HTTP lives in this process (one per OPTJOB_HOME: if a
    # daemon already holds the executor lock, it keeps running the jobs instead).
    with hosted_executor(load_settings()):
        uvicorn.run(
            "optjob.api.app:make_app",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level=log_level,
        )
