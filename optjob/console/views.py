"""What a page shows, derived from what the store and the job's log already record.

Nothing here asks a worker anything: a job's row, its latest progress event, how it ended
(``JobRecord.outcome``) and its JSON-lines log are the whole source, so the console shows the same
truth as Describe and ``optjob logs`` and costs a running job nothing.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from optjob.api.shapes import TERMINAL_STATUSES
from optjob.jobs.figures import Figure, stage_figures
from optjob.jobs.logs import follow, format_record
from optjob.jobs.store import JobRecord

# Log stages that are bookkeeping, not work: time before one of them belongs to what preceded it.
_BOOKKEEPING = frozenset({"lifecycle", "executor", "worker", "plan"})
_LIFECYCLE = ("STARTING", "INPROGRESS", "STOPPING", "COMPLETED", "FAILED", "STOPPED")
REDACTED = "(hidden by the console)"


def iso(moment: float | None) -> str:
    if moment is None:
        return ""
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def seconds_text(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def bytes_text(size: float | None) -> str:
    if not size:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


@dataclass(frozen=True)
class JobRow:
    """One line of the job list, from a ListOptimizationJobs summary (wire names)."""

    name: str
    techniques: str
    instance_type: str
    status: str
    created: str
    duration: str

    @classmethod
    def from_summary(cls, summary: Mapping[str, Any], now: float) -> JobRow:
        started = summary.get("OptimizationStartTime")
        ended = summary.get("OptimizationEndTime")
        duration = None
        if started is not None:
            duration = (ended if ended is not None else now) - started
        return cls(
            name=summary["OptimizationJobName"],
            techniques=", ".join(summary.get("OptimizationTypes") or []),
            instance_type=summary.get("DeploymentInstanceType", ""),
            status=summary["OptimizationJobStatus"],
            created=iso(summary.get("CreationTime")),
            duration=seconds_text(duration),
        )


@dataclass(frozen=True)
class Progress:
    """The latest progress event as a bar: which step, how far, how long to go."""

    label: str
    percent: float | None
    eta: str
    message: str

    @classmethod
    def of(cls, record: JobRecord) -> Progress | None:
        if record.terminal:
            return None
        event = record.last_event
        if not event:
            waiting = "waiting for a worker" if record.status == "STARTING" else record.status.lower()
            return cls(label=waiting, percent=None, eta="", message="")
        fraction = event.get("fraction")
        percent = round(100 * float(fraction), 1) if isinstance(fraction, int | float) else None
        eta = event.get("eta_s")
        return cls(
            label="/".join(str(event[k]) for k in ("stage", "step") if event.get(k)),
            percent=percent,
            eta=seconds_text(eta) if isinstance(eta, int | float) else "",
            message=str(event.get("message", ""))[:300],
        )


@dataclass(frozen=True)
class TimelineEntry:
    status: str
    at: str
    message: str


@dataclass
class Detail:
    """Everything the job page shows."""

    name: str
    arn: str
    status: str
    terminal: bool
    instance_type: str
    techniques: str
    created: str
    started: str
    ended: str
    duration: str
    failure_reason: str
    request_json: str
    progress: Progress | None
    timeline: list[TimelineEntry]
    phases: dict[str, float]
    stage_phases: dict[str, dict[str, float]]
    figures: list[Figure]
    acceptance: dict[str, list[float]]
    sizes: dict[str, str]
    warnings: list[str]
    output_location: str
    image: str
    serve_commands: list[str]
    log_tail: list[str] = field(default_factory=list)

    def chart_data(self) -> str:
        """The charts' data as JSON, for the page's script (read from a data attribute, never inlined code)."""
        return json.dumps({"phases": self.phases, "stage_phases": self.stage_phases, "acceptance": self.acceptance})


def read_log(path: str | Path) -> list[dict[str, Any]]:
    return list(follow(Path(path), done=lambda: True, follow=False))


def timeline(records: Iterable[Mapping[str, Any]]) -> list[TimelineEntry]:
    return [
        TimelineEntry(str(r["step"]), iso(r.get("time")), str(r.get("message", ""))[:500])
        for r in records
        if r.get("stage") == "lifecycle" and r.get("step") in _LIFECYCLE
    ]


def phase_seconds(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Where the job's wall time went, from its log: each gap between two records belongs to the
    work the later record reports. Work that overlaps (a download beside quantization) is counted
    where its records fall, so the bars add up to the wall time, not to CPU time."""
    timed = [r for r in records if isinstance(r.get("time"), int | float)]
    timed.sort(key=lambda r: r["time"])
    phases: dict[str, float] = {}
    for before, after in zip(timed, timed[1:], strict=False):
        gap = float(after["time"]) - float(before["time"])
        if gap <= 0:
            continue
        stage, step = str(after.get("stage", "")), str(after.get("step", ""))
        if (before.get("stage"), before.get("step")) == ("lifecycle", "STARTING") or (stage, step) == (
            "executor",
            "spawned",
        ):
            phase = "queued"
        elif stage == "lifecycle" and step == "INPROGRESS":
            phase = "worker start"
        elif before.get("stage") == "lifecycle" and before.get("step") == "INPROGRESS":
            phase = "worker start (imports)"
        elif stage in _BOOKKEEPING:
            phase = str(before.get("stage", "")).lower() or "other"
            if phase in _BOOKKEEPING:
                phase = "other"
        else:
            phase = stage.lower()
        phases[phase] = round(phases.get(phase, 0.0) + gap, 3)
    return phases


def redact_environment(request: dict[str, Any], words: Sequence[str]) -> dict[str, Any]:
    """The request with secret-looking environment values hidden (OptimizationEnvironment and every
    config's OverrideEnvironment): a page is shown to people and screenshots travel."""
    upper = [w.upper() for w in words]

    def hide(env: Any) -> Any:
        if not isinstance(env, dict):
            return env
        return {k: REDACTED if any(w in str(k).upper() for w in upper) else v for k, v in env.items()}

    shown = json.loads(json.dumps(request))
    if "OptimizationEnvironment" in shown:
        shown["OptimizationEnvironment"] = hide(shown["OptimizationEnvironment"])
    for config in shown.get("OptimizationConfigs") or []:
        if isinstance(config, dict):
            for member in config.values():
                if isinstance(member, dict) and "OverrideEnvironment" in member:
                    member["OverrideEnvironment"] = hide(member["OverrideEnvironment"])
    return shown


def _stage_value(metrics: Mapping[str, Any], key: str) -> Any:
    for values in metrics.values():
        if isinstance(values, Mapping) and key in values:
            return values[key]
    return None


def serve_commands(output: str, image: str, metrics: Mapping[str, Any]) -> list[str]:
    """How a person serves the published directory with the recommended image, exactly."""
    if not output or not image:
        return []
    commands = [f"aws s3 sync {shlex.quote(output)} ./model"]
    if image.startswith("vllm/vllm-openai"):
        args = ["--model", "/model"]
        degree = _stage_value(metrics, "tensor_parallel_degree")
        if isinstance(degree, int):
            args += ["--load-format", "sharded_state", "--tensor-parallel-size", str(degree)]
        commands.append(f'docker run --rm --gpus all -p 8000:8000 -v "$PWD/model:/model" {image} ' + " ".join(args))
        return commands
    speculative = _stage_value(metrics, "speculative_config")
    device = "--device /dev/neuron0" if "neuronx" in image else "--gpus all"
    commands.append(f'docker run --rm {device} -p 8080:8080 -v "$PWD/model:/opt/ml/model" {image}')
    if isinstance(speculative, Mapping):
        config = json.dumps(speculative).replace("/opt/ml/model", "./model")
        commands.append(f"vllm serve ./model --speculative-config {shlex.quote(config)}")
    else:
        commands.append("vllm serve ./model")
    return commands


def job_detail(record: JobRecord, *, now: float, log_records: int, secret_words: Sequence[str]) -> Detail:
    request = json.loads(record.request_json)
    records = read_log(record.log_path)
    outcome = record.outcome
    metrics = outcome.get("metrics") or {}
    figures, stage_phases, acceptance = stage_figures(metrics)
    source_bytes, output_bytes = outcome.get("source_bytes"), outcome.get("output_bytes")
    sizes: dict[str, str] = {}
    if source_bytes:
        sizes["source"] = bytes_text(source_bytes)
    if output_bytes:
        sizes["output"] = bytes_text(output_bytes)
    if source_bytes and output_bytes:
        sizes["output / source"] = f"{output_bytes / source_bytes:.2f}"
    if outcome.get("bytes_downloaded") is not None and source_bytes:
        sizes["downloaded"] = bytes_text(outcome["bytes_downloaded"]) or "0 (from the cache)"
    output = (request.get("OutputConfig") or {}).get("S3OutputLocation", "")
    duration = None
    if record.start_time is not None:
        duration = (record.end_time if record.terminal and record.end_time else now) - record.start_time
    return Detail(
        name=record.name,
        arn=record.arn,
        status=record.status,
        terminal=record.status in TERMINAL_STATUSES,
        instance_type=record.instance_type,
        techniques=", ".join(record.types),
        created=iso(record.creation_time),
        started=iso(record.start_time),
        ended=iso(record.end_time) if record.terminal else "",
        duration=seconds_text(duration),
        failure_reason=record.failure_reason or "" if record.status == "FAILED" else "",
        request_json=json.dumps(redact_environment(request, secret_words), indent=2),
        progress=Progress.of(record),
        timeline=timeline(records),
        phases=phase_seconds(records),
        stage_phases=stage_phases,
        figures=figures,
        acceptance=acceptance,
        sizes=sizes,
        warnings=[str(w) for w in outcome.get("warnings") or []],
        output_location=output,
        image=record.output_image or "" if record.status == "COMPLETED" else "",
        serve_commands=serve_commands(output, record.output_image or "", metrics)
        if record.status == "COMPLETED"
        else [],
        log_tail=[format_record(r) for r in records[-log_records:]],
    )
