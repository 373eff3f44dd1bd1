"""Several workers for one streaming job (MaxInstanceCount > 1): helpers make some output shards.

The job's own worker walks the source shards from the first; helpers are handed shards from the
last, at most ``farm.slots`` at a time, so the two ends meet without any shard being done twice.
When the worker reaches a shard a helper holds, it waits for it; a helper that failed (or whose
node was lost) leaves its shard to the worker, which does it itself. A helper's shard is accepted
exactly like one an earlier attempt finished: read back from S3, its sha256 re-checked, spooled for
the end-to-end check (``tensor_streaming``). So the manifest, the gate and every byte of the
output are the same whichever worker made each file; the publisher still writes the manifest last.

What runs a helper is the executor's business (``optjob.jobs.ray_farm`` on Ray); this module only
schedules and accepts. A helper runs ``shard_helper.run_shard_unit``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from optjob.runtime.cancel import CancelToken
from optjob.runtime.events import NULL_SINK, EventSink
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
