"""``/metrics`` (Prometheus text format), ``/healthz`` and ``/readyz`` on the API's port.

Job figures are read from the store at scrape time, not counted in this process: workers, other
replicas' API processes and a restarted server all write the store, so a scrape of any process
reports the same jobs. Only API request latency is this process's own (a histogram per process;
with ``--workers N`` each uvicorn worker answers for the requests it served).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from optjob.api.shapes import OPERATIONS
from optjob.console.config import observability_config
from optjob.jobs.figures import gate_passed, phase_timings
from optjob.jobs.store import Store

_TARGET_PREFIX = "SageMaker."


class _Observations:
    """Values for one labelled histogram family, bucketed when the family is emitted."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = tuple(sorted(buckets))
        self.values: dict[tuple[str, ...], list[float]] = {}

    def add(self, labels: tuple[str, ...], value: float) -> None:
        self.values.setdefault(labels, []).append(max(0.0, value))

    def family(self, name: str, doc: str, label_names: list[str]) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, doc, labels=label_names)
        for labels, values in sorted(self.values.items()):
            cumulative = [(f"{bound:g}", float(sum(1 for v in values if v <= bound))) for bound in self.buckets]
            cumulative.append(("+Inf", float(len(values))))
            family.add_metric(list(labels), cumulative, sum_value=sum(values))
        return family


class JobsCollector(Collector):
    """Everything /metrics says about jobs, derived from the store when scraped."""

    def __init__(self, store: Callable[[], Store], executor_slots: Callable[[], int | None]) -> None:
        self._store = store
        self._slots = executor_slots

    def collect(self) -> Iterable[Metric]:
        config = observability_config().metrics
        store = self._store()
        jobs = GaugeMetricFamily(
            "optjob_jobs", "Jobs in the store by status and optimization type", labels=["status", "technique"]
        )
        counts: dict[tuple[str, str], int] = {}
        for status, types, count in store.count_by_status_and_type():
            for technique in [t for t in types.split("|") if t] or ["none"]:
                counts[(status, technique)] = counts.get((status, technique), 0) + count
        for (status, technique), count in sorted(counts.items()):
            jobs.add_metric([status, technique], count)
        yield jobs

        durations = _Observations(config.job_seconds_buckets)
        phases = _Observations(config.phase_seconds_buckets)
        downloaded = uploaded = 0
        gate = {"pass": 0, "fail": 0}
        for record in store.ended():
            if record.start_time is not None and record.end_time is not None:
                durations.add((record.status,), record.end_time - record.start_time)
            outcome = record.outcome
            metrics = outcome.get("metrics") or {}
            downloaded += int(outcome.get("bytes_downloaded") or 0)
            uploaded += int(outcome.get("output_bytes") or 0)
            for stage, phase, seconds in phase_timings(metrics):
                phases.add((stage, phase), seconds)
            passed = gate_passed(metrics) if record.status == "COMPLETED" else None
            if passed is not None:
                gate["pass" if passed else "fail"] += 1
            elif record.status == "FAILED" and outcome.get("failure_kind") == "verification":
                gate["fail"] += 1
        yield durations.family(
            "optjob_job_duration_seconds", "Start-to-end time of ended jobs, by final status", ["status"]
        )
        yield phases.family(
            "optjob_job_phase_seconds", "Seconds per phase of completed jobs' stages (from their figures)",
            ["stage", "phase"],
        )  # fmt: skip
        yield CounterMetricFamily(
            "optjob_downloaded_bytes", "Bytes completed jobs downloaded from S3 (cache hits count 0)", value=downloaded
        )
        yield CounterMetricFamily("optjob_uploaded_bytes", "Bytes completed jobs published to S3", value=uploaded)
        checks = CounterMetricFamily(
            "optjob_gate_checks", "Verification gate outcomes of ended jobs", labels=["result"]
        )
        for result, count in gate.items():
            checks.add_metric([result], count)
        yield checks
        active = store.active()
        slots = GaugeMetricFamily(
            "optjob_executor_slots", "Executor slots: jobs running now, and the total", labels=["state"]
        )
        slots.add_metric(["in_use"], sum(1 for r in active if r.worker_pid is not None or r.executor_ref))
        total = self._slots()
        if total is not None:
            slots.add_metric(["total"], total)
        yield slots
        queued = GaugeMetricFamily("optjob_jobs_waiting", "STARTING jobs no worker has claimed yet")
        queued.add_metric([], sum(1 for r in active if r.status == "STARTING" and r.worker_pid is None))
        yield queued


class RequestMetrics:
    """ASGI middleware: API request latency by operation (X-Amz-Target, or the route) and status code."""

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.histogram.labels(_operation(scope), str(status["code"])).observe(time.perf_counter() - started)


def _operation(scope: Scope) -> str:
    path = scope.get("path", "")
    if path == "/":
        for key, value in scope.get("headers", []):
            if key == b"x-amz-target":
                target = value.decode("latin-1")
                operation = target[len(_TARGET_PREFIX) :] if target.startswith(_TARGET_PREFIX) else ""
                # Only the operations the API serves become label values: a caller cannot mint series.
                return operation if operation in OPERATIONS else "unknown"
        return "unknown"
    if path.startswith("/console"):
        return "console"
    return path.strip("/") if path in ("/metrics", "/healthz", "/readyz") else "other"


def observability(
    service: Callable[[], Any], *, executor_running: Callable[[], bool]
) -> tuple[list[BaseRoute], Middleware]:
    """The three routes and the middleware that times every request, sharing one registry.

    ``executor_running``: whether an executor holds this data directory's lock. When none does, the
    server is still ready if no job waits (one starts on the next Create)."""
    registry = CollectorRegistry(auto_describe=True)
    latency = Histogram(
        "optjob_api_request_seconds", "API request latency by operation and HTTP status",
        ["operation", "code"], registry=registry, buckets=observability_config().metrics.request_seconds_buckets,
    )  # fmt: skip

    def slots() -> int | None:
        settings = service().settings
        return settings.executor_slots if settings.executor == "local" else None

    registry.register(JobsCollector(lambda: service().store, slots))

    async def metrics(request: Request) -> Response:
        body = await run_in_threadpool(generate_latest, registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    def ready() -> tuple[int, dict[str, Any]]:
        checks: dict[str, Any] = {}
        try:
            service().store.ping()
            checks["store"] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure to read the store means not ready
            checks["store"] = f"unreachable: {type(exc).__name__}: {exc}"
        if executor_running():
            checks["executor"] = "running"
        elif checks["store"] == "ok" and not service().store.active():
            checks["executor"] = "idle (starts on the next Create)"
        else:
            checks["executor"] = "not running"
        good = checks["store"] == "ok" and checks["executor"] != "not running"
        return (200 if good else 503), {"ready": good, "checks": checks}

    async def readyz(request: Request) -> Response:
        status, body = await run_in_threadpool(ready)
        return JSONResponse(body, status_code=status)

    routes: list[BaseRoute] = [
        Route("/metrics", metrics, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
    ]
    return routes, Middleware(RequestMetrics, histogram=latency)
