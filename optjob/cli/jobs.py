"""``optjob create|describe|list|stop|delete|logs|wait|run`` and ``optjob models``: the job CLI.

Thin over ``optjob.jobs.service``: each command builds the same request the HTTP API would
receive, calls the service, and prints. Errors print as ``Code: message`` on stderr (exit 1).
``wait`` and ``run`` exit 0 only for COMPLETED (1 FAILED, 2 STOPPED, 3 timed out waiting).
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from optjob.api.errors import ApiError, ValidationException, parse
from optjob.api.shapes import TERMINAL_STATUSES, ListOptimizationJobsRequest
from optjob.cli import app
from optjob.cli.validate import UnreadableSpec, load_request
from optjob.jobs.daemon import ensure_executor, hosted_executor
from optjob.jobs.logs import follow, format_record
from optjob.jobs.service import JobService
from optjob.jobs.store import JobRecord

EXIT_CODES = {"COMPLETED": 0, "FAILED": 1, "STOPPED": 2}
EXIT_WAIT_TIMEOUT = 3
_STATUS_STYLE = {
    "COMPLETED": "green", "FAILED": "red", "STOPPED": "yellow",
    "STOPPING": "yellow", "INPROGRESS": "cyan", "STARTING": "blue",
}  # fmt: skip

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

models_app = typer.Typer(help="SageMaker model names that ModelSource/OutputConfig.SageMakerModel can use.")
app.add_typer(models_app, name="models")

NameArg = Annotated[str, typer.Argument(help="OptimizationJobName.")]


@contextmanager
def _api_errors() -> Iterator[None]:
    """Print API and spec errors the way `optjob validate` does, and exit 1 (2 for unreadable files)."""
    try:
        yield
    except UnreadableSpec as exc:
        err.print(f"[red]unreadable:[/red] {exc}")
        raise typer.Exit(2) from None
    except ApiError as exc:
        err.print(f"[red]{exc.code}[/red]: {exc.message}")
        raise typer.Exit(1) from None


def _service() -> JobService:
    return JobService()


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _styled(status: str) -> str:
    return f"[{_STATUS_STYLE.get(status, 'white')}]{status}[/]"


def _progress_text(event: dict[str, Any] | None) -> str:
    if not event:
        return ""
    text = "/".join(str(event[k]) for k in ("stage", "step") if event.get(k))
    if isinstance(event.get("fraction"), int | float):
        text += f" {event['fraction'] * 100:.0f}%"
    if isinstance(event.get("eta_s"), int | float):
        text += f" (eta {event['eta_s']:.0f}s)"
    return text


# --- create / describe / list / stop / delete -------------------------------------------------


@app.command()
def create(
    spec: Annotated[str, typer.Argument(help="CreateOptimizationJob request (JSON or YAML file; - for stdin).")],
) -> None:
    """Create a job from a request file and print its ARN; the local executor runs it.

    The request is validated exactly as `optjob validate` does. If no executor is running for
    this data directory, one is started in the background (it exits when idle).
    """
    with _api_errors():
        response = _service().create(load_request(spec))
    out.print(response.optimization_job_arn)


@app.command()
def describe(
    name: NameArg,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print exactly the DescribeOptimizationJob response.")
    ] = False,
) -> None:
    """Show a job: status, times, techniques, failure reason, recommended image, latest progress."""
    service = _service()
    with _api_errors():
        response = service.describe(name)
        record = service.get(name)
    if as_json:
        print(json.dumps(response.dump(), indent=2))
        return
    rows = [
        ("Name", response.optimization_job_name),
        ("ARN", response.optimization_job_arn),
        ("Status", _styled(response.optimization_job_status)),
        ("Techniques", ", ".join(record.types)),
        ("Instance", response.deployment_instance_type),
        ("Source", _source_text(response.model_source.dump())),
        ("Output", response.output_config.s3_output_location),
        ("Created", _when(record.creation_time)),
        ("Started", _when(record.start_time)),
        ("Ended", _when(record.end_time) if record.terminal else "-"),
        ("Modified", _when(record.last_modified_time)),
    ]
    if response.stopping_condition.max_runtime_in_seconds:
        rows.append(("Max runtime", f"{response.stopping_condition.max_runtime_in_seconds} s"))
    if not record.terminal and record.last_event:
        rows.append(("Progress", _progress_text(record.last_event)))
    if response.failure_reason:
        rows.append(("Failure", f"[red]{response.failure_reason}[/red]"))
    if response.optimization_output and response.optimization_output.recommended_inference_image:
        rows.append(("Image", response.optimization_output.recommended_inference_image))
    rows.append(("Log", record.log_path))
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        out.print(f"{label:<{width}}  {value}")


def _source_text(source: dict[str, Any]) -> str:
    if "S3" in source:
        return source["S3"].get("S3Uri", "")
    return f"SageMaker model {source.get('SageMakerModel', {}).get('ModelName', '')}"


@app.command("list")
def list_jobs(
    status: Annotated[str | None, typer.Option("--status", help="StatusEquals, e.g. INPROGRESS.")] = None,
    name_contains: Annotated[str | None, typer.Option(help="NameContains (case-insensitive).")] = None,
    optimization_contains: Annotated[
        str | None, typer.Option(help="OptimizationContains: Quantization, Compilation, Sharding, SpeculativeDecoding.")
    ] = None,
    created_after: Annotated[str | None, typer.Option(help="CreationTimeAfter (epoch seconds or ISO-8601).")] = None,
    created_before: Annotated[str | None, typer.Option(help="CreationTimeBefore.")] = None,
    modified_after: Annotated[str | None, typer.Option(help="LastModifiedTimeAfter.")] = None,
    modified_before: Annotated[str | None, typer.Option(help="LastModifiedTimeBefore.")] = None,
    sort_by: Annotated[str | None, typer.Option(help="Name, CreationTime (default) or Status.")] = None,
    sort_order: Annotated[str | None, typer.Option(help="Ascending (default) or Descending.")] = None,
    max_results: Annotated[int | None, typer.Option(help="Page size, 1..100 (default 50).")] = None,
    next_token: Annotated[str | None, typer.Option(help="NextToken from a previous page.")] = None,
    all_pages: Annotated[bool, typer.Option("--all", help="Follow NextToken to the end.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the ListOptimizationJobs response(s).")] = False,
) -> None:
    """List jobs as a table; every ListOptimizationJobs filter is an option."""
    wire: dict[str, Any] = {
        "StatusEquals": status,
        "NameContains": name_contains,
        "OptimizationContains": optimization_contains,
        "CreationTimeAfter": created_after,
        "CreationTimeBefore": created_before,
        "LastModifiedTimeAfter": modified_after,
        "LastModifiedTimeBefore": modified_before,
        "SortBy": sort_by,
        "SortOrder": sort_order,
        "MaxResults": max_results,
        "NextToken": next_token,
    }
    wire = {key: value for key, value in wire.items() if value is not None}
    service = _service()
    summaries: list[dict[str, Any]] = []
    token: str | None = None
    with _api_errors():
        while True:
            response = service.list(parse(ListOptimizationJobsRequest, wire)).dump()
            if as_json:
                print(json.dumps(response, indent=2))
            summaries.extend(response["OptimizationJobSummaries"])
            token = response.get("NextToken")
            if not (all_pages and token):
                break
            wire["NextToken"] = token
    if as_json:
        return
    table = Table(box=None, header_style="bold")
    for column in ("NAME", "STATUS", "TECHNIQUES", "INSTANCE", "CREATED", "ENDED"):
        table.add_column(column)
    for item in summaries:
        table.add_row(
            item["OptimizationJobName"],
            _styled(item["OptimizationJobStatus"]),
            ",".join(item["OptimizationTypes"]),
            item["DeploymentInstanceType"],
            _when(item["CreationTime"]),
            _when(item.get("OptimizationEndTime")),
        )
    out.print(table)
    if token and not all_pages:
        err.print(f"more: --next-token {token}")


@app.command()
def stop(
    name: NameArg,
    wait_for_it: Annotated[bool, typer.Option("--wait", help="Wait until the job is STOPPED.")] = False,
) -> None:
    """Stop a STARTING or INPROGRESS job: SIGTERM to its worker, SIGKILL after the grace period."""
    service = _service()
    with _api_errors():
        service.stop(name)
    out.print(f"{name}: STOPPING")
    if wait_for_it:
        record = _watch(service, name, show=False)
        out.print(f"{name}: {_styled(record.status)}")


@app.command()
def delete(name: NameArg) -> None:
    """Delete a terminal job's record. Its artifacts and log file are kept."""
    with _api_errors():
        _service().delete(name)
    out.print(f"{name}: deleted")


# --- logs / wait / run ---------------------------------------------------------------------


@app.command()
def logs(
    name: NameArg,
    follow_: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")] = False,
    raw: Annotated[bool, typer.Option("--raw", help="Print the JSON lines as stored.")] = False,
) -> None:
    """Print a job's log: lifecycle, progress events (stage, step, fraction, ETA) and signals."""
    service = _service()
    with _api_errors():
        record = service.get(name)
    if follow_ and not record.terminal:
        ensure_executor(service.settings)

    def done() -> bool:
        current = service.store.get(record.job_key)
        return current is None or current.terminal

    for entry in follow(Path(record.log_path), done=done, follow=follow_):
        print(json.dumps(entry) if raw else format_record(entry), flush=True)


@app.command()
def wait(
    name: NameArg,
    timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds (exit 3).")] = None,
) -> None:
    """Show progress until the job ends; exit 0 only if it COMPLETED (1 FAILED, 2 STOPPED)."""
    service = _service()
    with _api_errors():
        record = service.get(name)
    if not record.terminal:
        ensure_executor(service.settings)
    record = _watch(service, name, timeout=timeout)
    _finish(record)


@app.command()
def run(
    spec: Annotated[str, typer.Argument(help="CreateOptimizationJob request (JSON or YAML file; - for stdin).")],
) -> None:
    """Create a job and run it in the foreground with live progress.

    Ctrl-C stops the job cleanly (SIGTERM to the worker, then the grace period) and waits for
    STOPPED; a second Ctrl-C stops waiting (the job still ends; a background executor finishes it).
    Exit 0 only if the job COMPLETED.
    """
    service = JobService(start_executor=False)
    with _api_errors():
        request = load_request(spec)
    name = request.optimization_job_name
    with hosted_executor(service.settings) as hosted:
        with _api_errors():
            response = service.create(request)
        if not hosted:
            ensure_executor(service.settings)  # another control process runs it; make sure one does
        err.print(f"{response.optimization_job_arn} ({'running here' if hosted else 'running on the executor'})")
        interrupts = 0

        def on_interrupt(_signum: int, _frame: Any) -> None:
            nonlocal interrupts
            interrupts += 1
            if interrupts == 1:
                err.print("\nStopping the job (Ctrl-C again to stop waiting)...")
                with contextlib.suppress(ValidationException):  # it ended on its own meanwhile
                    service.stop(name)
            else:
                raise KeyboardInterrupt

        previous = signal.signal(signal.SIGINT, on_interrupt)
        try:
            record = _watch(service, name)
        except KeyboardInterrupt:
            err.print(f"Not waiting any more; {name} is {service.get(name).status}")
            raise typer.Exit(130) from None
        finally:
            signal.signal(signal.SIGINT, previous)
    _finish(record)


def _finish(record: JobRecord) -> None:
    out.print(f"{record.name}: {_styled(record.status)}")
    if record.status == "FAILED":
        err.print(f"[red]FailureReason[/red]: {record.failure_reason}")
    elif record.status == "COMPLETED" and record.output_image:
        out.print(f"RecommendedInferenceImage: {record.output_image}")
    raise typer.Exit(EXIT_CODES.get(record.status, 1))


def _watch(
    service: JobService, name: str, *, timeout: float | None = None, show: bool = True, poll_s: float = 0.3
) -> JobRecord:
    """Poll the store until the job is terminal, showing a progress bar (or lines, off a terminal)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    render = _bar if (show and err.is_terminal) else _lines if show else _silent
    with render() as update:
        while True:
            record = service.get(name)
            update(record)
            if record.status in TERMINAL_STATUSES:
                return record
            if deadline is not None and time.monotonic() > deadline:
                err.print(f"{name} is still {record.status} after {timeout:g} s")
                raise typer.Exit(EXIT_WAIT_TIMEOUT)
            time.sleep(poll_s)


@contextmanager
def _bar() -> Iterator[Callable[[JobRecord], None]]:
    progress = Progress(
        TextColumn("{task.fields[status]}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )
    task = progress.add_task("", total=1.0, status="")

    def update(record: JobRecord) -> None:
        event = record.last_event or {}
        fraction = event.get("fraction") if not record.terminal else 1.0
        progress.update(
            task,
            completed=fraction if isinstance(fraction, int | float) else 0.0,
            description=_progress_text(event) if not record.terminal else "",
            status=_styled(record.status),
        )

    with progress:
        yield update


@contextmanager
def _lines() -> Iterator[Callable[[JobRecord], None]]:
    """Off a terminal (CI, pipes): one line whenever the status or the stage/step changes."""
    last: list[str] = [""]

    def update(record: JobRecord) -> None:
        event = record.last_event or {}
        key = f"{record.status} {event.get('stage', '')}/{event.get('step', '')}"
        if key != last[0]:
            last[0] = key
            text = _progress_text(event) if not record.terminal else ""
            print(f"{record.status} {text}".rstrip(), file=sys.stderr, flush=True)

    yield update


@contextmanager
def _silent() -> Iterator[Callable[[JobRecord], None]]:
    yield lambda _record: None


# --- models -----------------------------------------------------------------------------------


@models_app.command("register")
def models_register(
    name: Annotated[str, typer.Argument(help="ModelName used in ModelSource.SageMakerModel.")],
    s3_uri: Annotated[str, typer.Argument(help="S3 prefix (or .tar.gz) holding the model.")],
) -> None:
    """Register (or re-point) a model name to an S3 location."""
    with _api_errors():
        _service().register_model(name, s3_uri)
    out.print(f"{name} -> {s3_uri}")


@models_app.command("list")
def models_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List registered models."""
    models = _service().list_models()
    if as_json:
        print(
            json.dumps(
                [{"ModelName": m.name, "S3Uri": m.s3_uri, "CreationTime": m.creation_time} for m in models], indent=2
            )
        )
        return
    table = Table(box=None, header_style="bold")
    for column in ("NAME", "S3 URI", "REGISTERED"):
        table.add_column(column)
    for model in models:
        table.add_row(model.name, model.s3_uri, _when(model.creation_time))
    out.print(table)
