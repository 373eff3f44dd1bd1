"""The ``optjob`` command: thin typer commands over jobs.service and pipeline, no logic of their own.

Each command group lives in its own module and registers on ``app``; ``main`` is the console
script entry point.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="optjob",
    help=(
        "Self-hosted model optimization that speaks the Amazon SageMaker optimization-job API.\n\n"
        "Give it the JSON that `aws sagemaker create-optimization-job --cli-input-json` takes: it checks "
        "the request against the target instance, downloads the model from S3, quantizes/compiles it, "
        "verifies the result and publishes a deployable model directory.\n\n"
        "Start with `optjob validate SPEC.json` to see the plan a request turns into."
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)


@app.callback()
def _root() -> None:
    """Self-hosted model optimization that speaks the Amazon SageMaker optimization-job API."""


def _register_commands() -> None:
    from optjob.cli import jobs, serve, validate, verify  # noqa: F401


def main() -> None:
    _register_commands()
    app(prog_name="optjob")
