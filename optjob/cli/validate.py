"""``optjob validate``: check a CreateOptimizationJob request without running anything."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console

from optjob.api.errors import ApiError, ValidationException, parse
from optjob.api.shapes import CreateOptimizationJobRequest
from optjob.cli import app
from optjob.pipeline.plan import Plan, build_plan
from optjob.pipeline.stage import technique_for
from optjob.settings import load_settings

EXIT_VALID, EXIT_INVALID, EXIT_UNREADABLE = 0, 1, 2


class UnreadableSpec(Exception):
    """The file could not be read or is neither JSON nor YAML."""


def read_spec(source: str) -> dict[str, Any]:
    """A request from a JSON or YAML file, or ``-`` for stdin; ``file://`` prefixes are accepted."""
    if source.startswith("file://"):
        source = source[len("file://") :]
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        raise UnreadableSpec(f"cannot read {source}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as json_error:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError:
            raise UnreadableSpec(f"{source} is neither valid JSON ({json_error}) nor YAML") from None
    if not isinstance(data, dict):
        raise UnreadableSpec(f"{source} must hold a JSON/YAML object (the request), not {type(data).__name__}")
    return data


def print_api_error(console: Console, exc: ApiError) -> None:
    """The error code, then each violation on its own line (the API joins them with '; ')."""
    console.print(f"invalid: {exc.code}", markup=False, highlight=False, style="red")
    header, _, rest = exc.message.partition(": ") if exc.message[:1].isdigit() else ("", "", exc.message)
    if header:
        console.print(header + ":", markup=False, highlight=False)
    for item in rest.split("; "):
        console.print(f"  - {item}", markup=False, highlight=False, soft_wrap=True)


def _read_model_config(model_config: Path, err: Console) -> dict:
    path = model_config / "config.json" if model_config.is_dir() else model_config
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        err.print(f"unreadable: {path}: {exc}", markup=False, highlight=False, style="red", soft_wrap=True)
        raise typer.Exit(EXIT_UNREADABLE) from None


def _model_problems(plan: Plan, config: dict) -> list[str]:
    problems: list[str] = []
    for stage in plan.stages:
        problems += technique_for(stage.technique).model_problems(stage, config, plan.target)
    return problems


def _model_plan_lines(plan: Plan, config: dict) -> list[str]:
    return [
        line
        for stage in plan.stages
        for line in technique_for(stage.technique).model_plan_lines(stage, config, plan.target)
    ]


def load_request(source: str) -> CreateOptimizationJobRequest:
    return parse(CreateOptimizationJobRequest, read_spec(source))


@app.command()
def validate(
    spec: Annotated[
        str,
        typer.Argument(
            help="CreateOptimizationJob request as JSON (what `aws sagemaker create-optimization-job "
            "--cli-input-json` takes) or YAML; `-` reads stdin.",
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the resolved plan as JSON.")] = False,
    model_config: Annotated[
        Path | None,
        typer.Option(
            "--model-config",
            help="The model's config.json (or its directory): also check the model against each technique, "
            "e.g. that OPTION_TENSOR_PARALLEL_DEGREE divides its attention heads for sharding. Jobs make "
            "this check when config.json arrives; this makes it before a job exists.",
        ),
    ] = None,
) -> None:
    """Check a request against the API contract, the target instance and the technique rules.

    Prints `valid` and the plan (target accelerator, techniques in order, recommended image), or
    every validation error in SageMaker's format. Exit status: 0 valid, 1 invalid, 2 unreadable.

    Example: optjob validate configs/examples/fp8-g6-12xlarge.json

    Example: optjob validate configs/examples/shard-tp2-g6-12xlarge.json --model-config ./my-model/
    """
    out = Console()
    err = Console(stderr=True)
    try:
        request = load_request(spec)
        plan = build_plan(request, region=load_settings().region)
    except UnreadableSpec as exc:
        err.print(f"unreadable: {exc}", markup=False, highlight=False, style="red", soft_wrap=True)
        raise typer.Exit(EXIT_UNREADABLE) from None
    except ApiError as exc:
        print_api_error(err, exc)
        raise typer.Exit(EXIT_INVALID) from None
    config = _read_model_config(model_config, err) if model_config is not None else None
    if config is not None:
        problems = _model_problems(plan, config)
        if problems:
            print_api_error(err, ValidationException(
                f"{len(problems)} problem{'s' if len(problems) != 1 else ''} with the model for this request: "
                + "; ".join(problems)
            ))  # fmt: skip
            raise typer.Exit(EXIT_INVALID)
    if as_json:
        print(plan.model_dump_json(indent=2))
        return
    out.print("valid", style="green", markup=False)
    for line in plan.summary_lines() + (_model_plan_lines(plan, config) if config is not None else []):
        out.print("  " + line, markup=False, highlight=False, soft_wrap=True)
