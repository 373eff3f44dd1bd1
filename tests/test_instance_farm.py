"""The two-ended schedule of a multi-worker streaming job (optjob/pipeline/shard_farm.py)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from optjob.errors import JobCancelled
from optjob.pipeline.shard_farm import FarmedShards, HelperResult
from optjob.runtime.cancel import CancelToken
from optjob.storage.progress import FinishedUnit


class Farm:
    """Helpers that finish a shard once the test says so; ``fail`` names shards whose helper fails."""

    def __init__(self, slots: int, fail: tuple[str, ...] = ()) -> None:
        self.slots, self.fail = slots, fail
        self.submitted: list[str] = []
        self.finished: set[str] = set()
        self.cancelled: list[str] = []

    def submit(self, rel: str, etag: str) -> str:
        assert etag == f"etag-{rel}"
        self.submitted.append(rel)
        return rel

    def ready(self, ticket: Any) -> bool:
        return ticket in self.finished

    def result(self, ticket: Any) -> HelperResult:
        if ticket in self.fail:
            return HelperResult(rel=ticket, node="node-b", seconds=1.0, error="RuntimeError: boom")
        return HelperResult(rel=ticket, node="node-b", seconds=1.0, unit=FinishedUnit(path=ticket, size=1, sha256="0"))

    def cancel(self, ticket: Any) -> None:
        self.cancelled.append(ticket)


def schedule(farm: Farm, weights: list[str], cancel: CancelToken | None = None) -> FarmedShards:
    return FarmedShards(farm, weights, {rel: f"etag-{rel}" for rel in weights}, cancel=cancel or CancelToken())


def test_helpers_take_shards_from_the_end_and_the_worker_from_the_start() -> None:
    weights = [f"s{i}" for i in range(6)]
    farm = Farm(slots=1)
    farmed = schedule(farm, weights)
    done_here: list[str] = []
    for index, rel in enumerate(weights):
        farmed.top_up(index)
        farm.finished.update(farm.submitted)  # each helper finishes while the worker does one shard
        if farmed.take(rel) is None:
            done_here.append(rel)
    assert farm.submitted == ["s5", "s4", "s3"] and done_here == ["s0", "s1", "s2"]
    figures = farmed.figures()
    assert sorted(figures["shards_by_helpers"]) == ["s3", "s4", "s5"] and not figures["helper_failures"]


def test_a_failed_helper_leaves_its_shard_to_the_worker() -> None:
    farm = Farm(slots=2, fail=("s3",))
    farmed = schedule(farm, ["s0", "s1", "s2", "s3"])
    farmed.top_up(0)
    assert farm.submitted == ["s3", "s2"]
    farm.finished.update(farm.submitted)
    assert farmed.take("s0") is None
    result = farmed.take("s3")
    assert result is not None and result.unit is None and "boom" in result.error
    assert farmed.figures()["helper_failures"] == {"s3": "node-b: RuntimeError: boom"}


def test_stop_while_waiting_for_a_helper_cancels_the_helpers() -> None:
    cancel = CancelToken()
    farm = Farm(slots=2)
    farmed = schedule(farm, ["s0", "s1", "s2"], cancel)
    farmed.top_up(0)
    threading.Timer(0.2, cancel.cancel, args=("stopped",)).start()
    with pytest.raises(JobCancelled):
        farmed.take("s2")  # never finishes: only the Stop ends the wait
    assert sorted(farm.cancelled) == ["s1", "s2"] and not farmed.tickets
