"""Several workers for one streaming job (MaxInstanceCount > 1): helpers make some output shards.

The job's own worker walks the source shards from the first; helpers are handed shards from the
last, at most ``farm.slots`` at a time, so the two ends meet without any shard being done twice.
When the worker reaches a shard a helper holds, it waits for it; a helper that failed (or whose
node was lost) leaves its shard to the worker, which does it itself. A helper's shard is accepted
exactly like one an earlier attempt finished: read back from S3, its sha256 re-checked, spooled for
the end-to-end check (``tensor_streaming._Resume``). So the manifest, the gate and every byte of the
output are the same whichever worker made each file; the publisher still writes the manifest last.

What runs a helper is the executor's business (``optjob.jobs.ray_farm`` on Ray); this module only
schedules and accepts. A helper runs ``run_shard_unit`` below.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from optjob.errors import InputError
from optjob.pipeline.cancel import CancelToken
from optjob.pipeline.events import NULL_SINK, EventSink
from optjob.pipeline.plan import Plan
from optjob.pipeline.stage import StageContext, TensorStreamingTechnique, technique_for
from optjob.storage.progress import FinishedUnit

_WAIT_S = 0.1


@dataclass
class HelperResult:
    """What a helper reports for one shard: the finished unit, or why there is none."""

    rel: str
    node: str
    seconds: float
    unit: FinishedUnit | None = None
    error: str | None = None


class ShardFarm(Protocol):
    """Runs ``run_shard_unit`` for one shard somewhere else; tickets are the farm's own handles."""

    slots: int

    def submit(self, rel: str, etag: str) -> Any: ...

    def ready(self, ticket: Any) -> bool: ...

    def result(self, ticket: Any) -> HelperResult: ...  # never raises: a failure is in ``error``

    def cancel(self, ticket: Any) -> None: ...


@dataclass
class FarmedShards:
    """The two-ended schedule over one job's weight files."""

    farm: ShardFarm
    weights: list[str]
    etags: dict[str, str]
    events: EventSink = NULL_SINK
    cancel: CancelToken = field(default_factory=CancelToken)
    tickets: dict[str, Any] = field(default_factory=dict)
    results: list[HelperResult] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._next_back = len(self.weights) - 1
        self._done: dict[str, HelperResult] = {}

    def top_up(self, reached: int) -> None:
        """Collect what helpers finished, then hand out shards after index ``reached`` (the worker's)
        while helpers are free."""
        for rel, ticket in list(self.tickets.items()):
            if self.farm.ready(ticket):
                del self.tickets[rel]
                self._done[rel] = self._collect(self.farm.result(ticket))
        while len(self.tickets) < self.farm.slots and self._next_back > reached:
            rel = self.weights[self._next_back]
            self._next_back -= 1
            self.tickets[rel] = self.farm.submit(rel, self.etags[rel])
            self.events("farm", "handed", None, f"{rel}: handed to a helper worker")

    def take(self, rel: str) -> HelperResult | None:
        """The helper's result for ``rel`` (waiting for it), or None if no helper was given it."""
        if rel in self._done:
            return self._done.pop(rel)
        ticket = self.tickets.get(rel)
        if ticket is None:
            return None
        while not self.farm.ready(ticket):
            if self.cancel.wait(_WAIT_S):
                self.stop()
                self.cancel.raise_if_cancelled()
        del self.tickets[rel]
        return self._collect(self.farm.result(ticket))

    def _collect(self, result: HelperResult) -> HelperResult:
        self.results.append(result)
        if result.unit is None:
            self.events("farm", "failed", None, f"{result.rel}: the helper on {result.node} failed ({result.error}); "
                        "doing it here", level="warning")  # fmt: skip
        return result

    def stop(self) -> None:
        for ticket in self.tickets.values():
            self.farm.cancel(ticket)
        self.tickets.clear()

    def figures(self) -> dict[str, Any]:
        made = [r for r in self.results if r.unit is not None]
        return {
            "helper_slots": self.farm.slots,
            "shards_by_helpers": {r.rel: {"node": r.node, "seconds": round(r.seconds, 2)} for r in made},
            "helper_failures": {r.rel: f"{r.node}: {r.error}" for r in self.results if r.unit is None},
        }


class _Collected:
    """Stands in for the job's progress log in a helper: the finished unit goes back to the job's worker."""

    def __init__(self) -> None:
        self.units: list[FinishedUnit] = []

    def record(self, unit: FinishedUnit) -> None:
        self.units.append(unit)


def run_shard_unit(plan: Plan, *, job_arn: str, rel: str, etag: str, work_dir: Path, storage: Any,
                   cancel: CancelToken | None = None) -> FinishedUnit:  # fmt: skip
    """A helper's work: make output shard ``rel`` of the job and upload it; the caller reports the unit.

    The helper never claims the output prefix, never writes the manifest or the progress record, and
    never deletes anything but its own unfinished upload: the job's worker owns the prefix.
    """
    from optjob.pipeline.streaming import weight_order
    from optjob.pipeline.tensor_streaming import open_shard_output, streaming_settings
    from optjob.runtime.phases import PhaseClock
    from optjob.storage.publish import Publisher
    from optjob.storage.stream import StreamingFetch
    from optjob.storage.tensorstream.reader import RemoteShard

    cancel = cancel or CancelToken()
    stage = plan.stages[0]
    technique = technique_for(stage.technique)
    if not isinstance(technique, TensorStreamingTechnique):
        raise InputError(f"{stage.technique} cannot be split over several workers")
    source_dir, out_dir = work_dir / "source", work_dir / "output"
    out_dir.mkdir(parents=True, exist_ok=True)
    read_ahead, window, _budget = streaming_settings()
    try:
        fetch = StreamingFetch(plan.source.s3_uri, source_dir, settings=storage, cancel=cancel)
        weights = weight_order(fetch)
        if fetch.remotes[rel].etag != etag:
            raise InputError(f"{rel} changed in {plan.source.s3_uri} while the job ran (ETag {etag} is gone)")
        small = sorted(set(fetch.remotes) - set(weights))
        fetch.start(order=small, only=True)
        for name in small:
            fetch.wait(name)
        clock = PhaseClock()
        publisher = Publisher(plan.output.s3_uri, job_name=plan.job_name, job_arn=job_arn,
                              kms_key_id=plan.output.kms_key_id, settings=storage, cancel=cancel)  # fmt: skip
        collected = _Collected()
        shard = RemoteShard(fetch.client, fetch.location.bucket, fetch.remotes[rel], read_ahead=read_ahead,
                            cancel=cancel, clock=clock, spool=source_dir / rel)  # fmt: skip
        ctx = StageContext(job_name=plan.job_name, input_dir=source_dir, output_dir=out_dir, work_dir=work_dir,
                           target=plan.target, env=stage.env, cancel=cancel, clock=clock)  # fmt: skip
        try:
            technique.run_tensor_units(
                stage, ctx, [shard], open_shard_output(publisher, collected, out_dir, window, clock)
            )
            shard.finish()
        finally:
            shard.close()
            fetch.stop()
        if len(collected.units) != 1:
            raise RuntimeError(f"the stage made {len(collected.units)} files from {rel}, expected 1")
        return collected.units[0]
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def timed_unit(plan_json: str, job_arn: str, rel: str, etag: str, work_dir: str, storage: Any, node: str) -> dict:
    """``run_shard_unit`` for a remote call: plain data in and out, failures reported, not raised."""
    started = time.monotonic()
    try:
        unit = run_shard_unit(Plan.model_validate_json(plan_json), job_arn=job_arn, rel=rel, etag=etag,
                              work_dir=Path(work_dir), storage=storage)  # fmt: skip
    except BaseException as exc:  # noqa: BLE001 - the job's worker does the shard itself instead
        return {"rel": rel, "node": node, "seconds": time.monotonic() - started,
                "error": f"{type(exc).__name__}: {str(exc)[:300]}"}  # fmt: skip
    return {"rel": rel, "node": node, "seconds": time.monotonic() - started, "unit": unit.model_dump(mode="json")}


def helper_result(payload: dict) -> HelperResult:
    unit = FinishedUnit.model_validate(payload["unit"]) if payload.get("unit") else None
    return HelperResult(rel=payload["rel"], node=payload["node"], seconds=payload["seconds"], unit=unit,
                        error=payload.get("error"))  # fmt: skip
