"""``optjob serve``: the SageMaker-compatible HTTP endpoint that boto3 and the AWS CLI use unchanged."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from optjob.api.app import NO_AUTH_ENV
from optjob.api.audit import AUDIT_LOG_ENV
from optjob.api.principals import CREDENTIALS_FILE_ENV, accounts, load_principals
from optjob.cli import app
from optjob.jobs.daemon import hosted_executor
from optjob.secret_files import SecretFileError
from optjob.settings import ASSUME_ROLE_ENV, EXECUTOR_ENV, ROLES_FILE_ENV, load_settings
from optjob.storage.credentials import roles_in_file

# Rich markup renders the help: section headers are escaped so they print as written.
_EPILOG = """\
Credentials file (--credentials-file), one section per principal; aws_account_id puts the key in
that account (omitted: the home account, OPTJOB_ACCOUNT_ID, 000000000000 by default):

    \\[team-a-ci]
    aws_access_key_id = AKIAEXAMPLETEAMA0001
    aws_secret_access_key = ...
    aws_account_id = 111122223333

Roles file (--roles-file), one section per role ARN with the keys a job with that role gets on
S3 (aws_session_token optional):

    \\[arn:aws:iam::111122223333:role/team-a-optjob]
    aws_access_key_id = TEAMAROLEKEY
    aws_secret_access_key = ...

Both files must be readable by their owner only (chmod 600). Each account sees only its own
jobs; a job may name only a role of its caller's account. Without --roles-file or --assume-role,
jobs use optjob's own AWS credentials and RoleArn is recorded only: that is allowed for one
account and refused when the credentials file names several.
"""


@app.command(epilog=_EPILOG)
def serve(
    host: Annotated[str, typer.Option(help="Address to bind. Anything but loopback exposes the API.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8080,
    workers: Annotated[int, typer.Option(min=1, help="HTTP worker processes (uvicorn).")] = 1,
    credentials_file: Annotated[
        Path | None,
        typer.Option(
            help="Who may call: access keys in ~/.aws/credentials format, one section per principal, with "
            "optional aws_account_id. OPTJOB_AUTH_KEYS=AKID:SECRET,... adds home-account keys.",
        ),
    ] = None,
    roles_file: Annotated[
        Path | None,
        typer.Option(
            help="Run each job with its RoleArn's keys from this INI file (sections are role ARNs): for "
            "S3-compatible stores without STS.",
        ),
    ] = None,
    assume_role: Annotated[
        bool,
        typer.Option(
            "--assume-role",
            help="Run each job with temporary credentials from sts:AssumeRole on its RoleArn (session name: "
            "the job's name), as SageMaker does on AWS.",
        ),
    ] = False,
    audit_log: Annotated[
        Path | None,
        typer.Option(help="JSON-lines audit log of every API call. Default: OPTJOB_HOME/audit.log."),
    ] = None,
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="Accept unsigned requests. Local development only.")
    ] = False,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "warning",
    executor: Annotated[
        str | None,
        typer.Option(
            help="What runs the jobs: 'local' (worker processes on this host, OPTJOB_EXECUTOR_SLOTS at once) or "
            "'ray' (one Ray actor per job on the cluster at RAY_ADDRESS, placed by the resources its stages need; "
            "pip install 'optjob[ray]'). Default: OPTJOB_EXECUTOR, else local.",
        ),
    ] = None,
) -> None:
    """Serve CreateOptimizationJob and friends over AWS JSON 1.1 with SigV4 authentication.

    Point boto3 at it with boto3.client("sagemaker", endpoint_url="http://HOST:PORT") or the AWS CLI
    with --endpoint-url; nothing else changes. People sign in to the web console at /console/ with the
    same keys (read-only unless the key's section says optjob_console = read-write); Prometheus scrapes
    /metrics. Jobs created here run on this host's executor, or on a Ray
    cluster with --executor ray.
    """
    import uvicorn

    console = Console(stderr=True)

    def refuse(message: str) -> None:
        console.print(f"optjob serve: {message}", style="red", markup=False, highlight=False)
        raise typer.Exit(2)

    if roles_file is not None and assume_role:
        refuse("give --roles-file or --assume-role, not both")
    if credentials_file is not None:
        os.environ[CREDENTIALS_FILE_ENV] = str(credentials_file)
    if roles_file is not None:
        os.environ[ROLES_FILE_ENV] = str(roles_file.expanduser().absolute())
        try:
            roles_in_file(roles_file)
        except SecretFileError as exc:
            refuse(str(exc))
    if assume_role:
        os.environ[ASSUME_ROLE_ENV] = "1"
    if executor is not None:
        if executor not in ("local", "ray"):
            refuse(f"--executor must be 'local' or 'ray', not {executor!r}")
        os.environ[EXECUTOR_ENV] = executor  # a daemon that takes over after us runs the same backend
    settings = load_settings()
    if settings.executor == "ray" and not settings.ray_address:
        refuse(
            "--executor ray needs a cluster: set RAY_ADDRESS to its GCS address (what `ray start --head` prints) "
            "or to 'auto' for a cluster started on this host"
        )
    os.environ[AUDIT_LOG_ENV] = str(audit_log or settings.home / "audit.log")
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
        try:
            principals = load_principals(settings.account_id)
        except (SecretFileError, ValueError) as exc:
            refuse(str(exc))
        if not principals:
            refuse(
                "no credentials configured. Give --credentials-file, set OPTJOB_AUTH_KEYS=AKID:SECRET, or pass "
                "--no-auth for local development only."
            )
        tenants = accounts(principals)
        if len(tenants) > 1 and settings.role_credentials == "ambient":
            refuse(
                f"the credentials file names {len(tenants)} accounts ({', '.join(sorted(tenants))}), so jobs must "
                "run with their own role's rights, never this server's credentials. Give --roles-file FILE "
                "(S3-compatible stores) or --assume-role (AWS STS)."
            )
    url = f"http://{host}:{port}"
    roles_note = {
        "ambient": "jobs use this server's AWS credentials; RoleArn is recorded only (single tenant)",
        "roles-file": f"jobs use their RoleArn's keys from {settings.roles_file}",
        "sts": "jobs use sts:AssumeRole on their RoleArn",
    }[settings.role_credentials]
    console.print(
        f"optjob serving the SageMaker optimization-job API at {url}\n"
        f'  boto3:   boto3.client("sagemaker", endpoint_url="{url}")\n'
        f"  AWS CLI: aws sagemaker list-optimization-jobs --endpoint-url {url}\n"
        f"  console: {url}/console/   metrics: {url}/metrics   health: {url}/healthz, {url}/readyz\n"
        f"  roles:   {roles_note}\n"
        f"  audit:   {os.environ[AUDIT_LOG_ENV]}\n"
        f"  runs on: "
        + (f"the Ray cluster at {settings.ray_address}" if settings.executor == "ray" else "this host's executor"),
        markup=False,
        highlight=False,
    )
    # The executor that runs jobs created over HTTP lives in this process (one per OPTJOB_HOME: if a
    # daemon already holds the executor lock, it keeps running the jobs instead).
    with hosted_executor(settings):
        uvicorn.run(
            "optjob.api.app:make_app",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level=log_level,
        )
