"""ListOptimizationJobs: every filter, every sort, MaxResults, and a NextToken that survives creates."""

# Fixtures are imported from tests.support.jobs, so their parameters shadow the imports.
# ruff: noqa: F811

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from optjob.api.errors import ValidationException
from optjob.config_files import load_config
from optjob.jobs.service import JobService
from optjob.settings import Settings, load_settings
from tests.support.jobs import home, make_request  # noqa: F401

T0 = 1_700_000_000.0
CONFIGS = {
    "Compilation": [{"ModelCompilationConfig": {}}],
    "Sharding": [{"ModelShardingConfig": {"OverrideEnvironment": {"OPTION_TENSOR_PARALLEL_DEGREE": "2"}}}],
    "SpeculativeDecoding": [{"ModelSpeculativeDecodingConfig": {"Technique": "EAGLE"}}],
}


class Clock:
    """Creation times one second apart, so order and time filters are exact."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        self.now += 1
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def big_settings(home: Any) -> Settings:  # noqa: F811
    return load_settings(max_active_jobs=1000)


@pytest.fixture
def svc(big_settings: Settings, clock: Clock) -> JobService:
    return JobService(big_settings, clock=clock, start_executor=False)


def create(svc: JobService, name: str, kind: str = "Compilation") -> None:
    svc.create(make_request(name, OptimizationConfigs=CONFIGS[kind]))


def names(svc: JobService, **wire: Any) -> list[str]:
    response = svc.handle("ListOptimizationJobs", wire)
    return [item["OptimizationJobName"] for item in response["OptimizationJobSummaries"]]


def all_pages(svc: JobService, sizes: list[int] | None = None, between: Any = None, **wire: Any) -> list[str]:
    seen: list[str] = []
    size = itertools.cycle(sizes or [3])
    token = None
    while True:
        request = {**wire, "MaxResults": next(size)} | ({"NextToken": token} if token else {})
        response = svc.handle("ListOptimizationJobs", request)
        seen.extend(item["OptimizationJobName"] for item in response["OptimizationJobSummaries"])
        token = response.get("NextToken")
        if not token:
            return seen
        if between:
            between()


@pytest.fixture
def populated(svc: JobService) -> JobService:
    """Six jobs, created in this order, in several statuses and techniques."""
    create(svc, "alpha", "Compilation")
    create(svc, "Bravo", "Sharding")
    create(svc, "charlie", "SpeculativeDecoding")
    create(svc, "delta-x", "Compilation")
    create(svc, "echo", "Sharding")
    create(svc, "foxtrot-x", "Compilation")
    svc.store.transition("alpha", expect=("STARTING",), to="COMPLETED", now=T0 + 100)
    svc.store.transition("charlie", expect=("STARTING",), to="INPROGRESS", now=T0 + 101, start_time=T0 + 101)
    svc.store.transition("echo", expect=("STARTING",), to="FAILED", now=T0 + 102, failure_reason="x")
    return svc


def test_summary_members(populated: JobService) -> None:
    summary = populated.handle("ListOptimizationJobs", {"NameContains": "charlie"})["OptimizationJobSummaries"][0]
    assert summary == {
        "OptimizationJobName": "charlie",
        "OptimizationJobArn": "arn:aws:sagemaker:us-east-1:000000000000:optimization-job/charlie",
        "CreationTime": T0 + 3,
        "OptimizationJobStatus": "INPROGRESS",
        "OptimizationStartTime": T0 + 101,
        "LastModifiedTime": T0 + 101,
        "DeploymentInstanceType": "ml.g6.12xlarge",
        "OptimizationTypes": ["SpeculativeDecoding"],
    }


def test_default_sort_is_creation_time_ascending(populated: JobService) -> None:
    order = ["alpha", "Bravo", "charlie", "delta-x", "echo", "foxtrot-x"]
    assert names(populated) == order
    assert names(populated, SortOrder="Descending") == order[::-1]


def test_sort_by_name_and_status(populated: JobService) -> None:
    assert names(populated, SortBy="Name") == sorted(["alpha", "Bravo", "charlie", "delta-x", "echo", "foxtrot-x"])
    assert names(populated, SortBy="Status") == ["alpha", "echo", "charlie", "Bravo", "delta-x", "foxtrot-x"]
    assert names(populated, SortBy="Status", SortOrder="Descending") == [
        "foxtrot-x", "delta-x", "Bravo", "charlie", "echo", "alpha",
    ]  # fmt: skip


def test_time_filters_are_strict(populated: JobService) -> None:
    assert names(populated, CreationTimeAfter=T0 + 2) == ["charlie", "delta-x", "echo", "foxtrot-x"]
    assert names(populated, CreationTimeBefore=T0 + 2) == ["alpha"]
    assert names(populated, CreationTimeAfter=T0 + 1, CreationTimeBefore=T0 + 4) == ["Bravo", "charlie"]
    assert names(populated, LastModifiedTimeAfter=T0 + 100) == ["charlie", "echo"]
    assert names(populated, LastModifiedTimeBefore=T0 + 101) == [
        "alpha", "Bravo", "delta-x", "foxtrot-x",
    ]  # fmt: skip
    # ISO-8601 is accepted too.
    assert names(populated, CreationTimeAfter="2023-11-14T22:13:25Z") == ["foxtrot-x"]


def test_name_optimization_and_status_filters(populated: JobService) -> None:
    assert names(populated, NameContains="-X") == ["delta-x", "foxtrot-x"]
    assert names(populated, NameContains="bravo") == ["Bravo"]
    assert names(populated, OptimizationContains="Compilation") == ["alpha", "delta-x", "foxtrot-x"]
    assert names(populated, OptimizationContains="shard") == ["Bravo", "echo"]
    assert names(populated, OptimizationContains="Speculative") == ["charlie"]
    assert names(populated, OptimizationContains="Quantization") == []
    assert names(populated, StatusEquals="STARTING") == ["Bravo", "delta-x", "foxtrot-x"]
    assert names(populated, StatusEquals="STARTING", NameContains="x", OptimizationContains="Compil") == [
        "delta-x", "foxtrot-x",
    ]  # fmt: skip


def test_optimization_types_literals_come_from_the_technique_table() -> None:
    literals = {rule["optimization_type"] for rule in load_config("techniques.yaml")["techniques"].values()}
    assert literals == {"Quantization", "Compilation", "Sharding", "SpeculativeDecoding"}


def test_max_results_bounds_and_default(svc: JobService) -> None:
    for index in range(53):
        create(svc, f"job-{index:03d}")
    first = svc.handle("ListOptimizationJobs", {})
    assert len(first["OptimizationJobSummaries"]) == 50 and first["NextToken"]
    rest = svc.handle("ListOptimizationJobs", {"NextToken": first["NextToken"]})
    assert len(rest["OptimizationJobSummaries"]) == 3 and "NextToken" not in rest
    for bad in (0, 101):
        with pytest.raises(ValidationException, match="maxResults"):
            svc.handle("ListOptimizationJobs", {"MaxResults": bad})
    assert len(names(svc, MaxResults=100)) == 53


@pytest.mark.parametrize(
    ("sort", "expect_new"),
    [
        ({}, ["new-0", "new-1", "new-2", "new-3"]),  # ascending creation: new jobs land after the cursor
        ({"SortOrder": "Descending"}, []),  # descending: they land before it
    ],
)
def test_next_token_is_stable_while_jobs_are_created(
    svc: JobService, sort: dict[str, str], expect_new: list[str]
) -> None:
    for index in range(10):
        create(svc, f"old-{index}")
    created = iter(range(100))

    def create_one() -> None:
        create(svc, f"new-{next(created)}")

    listed = all_pages(svc, [3], between=create_one, **sort)
    old = [name for name in listed if name.startswith("old-")]
    expected_old = [f"old-{i}" for i in range(10)]
    assert old == (expected_old if not sort else expected_old[::-1])
    assert [name for name in listed if name.startswith("new-")] == expect_new
    assert len(listed) == len(set(listed))


def test_next_token_by_name_with_inserts_on_both_sides(svc: JobService) -> None:
    for name in ("b1", "b2", "b3", "b4", "b5", "b6"):
        create(svc, name)
    inserted = iter(["a0", "z9", "z8", "a1"])
    listed = all_pages(svc, [2], between=lambda: create(svc, next(inserted)), SortBy="Name")
    # Inserted before the cursor: never shown; after it: shown once, in order.
    assert listed == ["b1", "b2", "b3", "b4", "b5", "b6", "z8", "z9"]


def test_token_is_bound_to_filters_and_sort(populated: JobService) -> None:
    token = populated.handle("ListOptimizationJobs", {"MaxResults": 2, "NameContains": "a"})["NextToken"]
    # MaxResults may change between pages...
    populated.handle("ListOptimizationJobs", {"MaxResults": 5, "NameContains": "a", "NextToken": token})
    # ...filters and sort may not.
    for other in ({"NameContains": "e"}, {"NameContains": "a", "SortOrder": "Descending"}, {}):
        with pytest.raises(ValidationException, match="different filters or sort order"):
            populated.handle("ListOptimizationJobs", {**other, "NextToken": token})
    for garbage in ("not-a-token", "e30", "!!!"):
        with pytest.raises(ValidationException, match="NextToken is not valid"):
            populated.handle("ListOptimizationJobs", {"NextToken": garbage})


@hypothesis_settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.integers(1, 7), min_size=1, max_size=5),
    sort_by=st.sampled_from(["Name", "CreationTime", "Status"]),
    order=st.sampled_from(["Ascending", "Descending"]),
)
def test_pages_concatenate_to_the_full_list(populated: JobService, sizes: list[int], sort_by: str, order: str) -> None:
    full = names(populated, SortBy=sort_by, SortOrder=order, MaxResults=100)
    assert all_pages(populated, sizes, SortBy=sort_by, SortOrder=order) == full
