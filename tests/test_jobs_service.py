"""The five operations' rules, against a real store and no executor (nothing runs here)."""

# Fixtures are imported from tests.support.jobs, so their parameters shadow the imports.
# ruff: noqa: F811

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from optjob.api.errors import (
    ResourceInUse,
    ResourceLimitExceeded,
    ResourceNotFound,
    UnknownOperationException,
    ValidationException,
)
from optjob.jobs.outcomes import MAX_FAILURE_REASON, fail
from optjob.jobs.service import JobService
from optjob.jobs.store import Store
from optjob.settings import load_settings
from tests.support.jobs import home, make_request, request_wire, service, settings  # noqa: F401

TAGS = [{"Key": "team", "Value": "ml"}]


def test_create_assigns_arn_status_and_times(service: JobService) -> None:
    before = time.time()
    response = service.create(make_request("job-a", Tags=TAGS))
    assert response.optimization_job_arn == "arn:aws:sagemaker:us-east-1:000000000000:optimization-job/job-a"
    described = service.handle("DescribeOptimizationJob", {"OptimizationJobName": "job-a"})
    assert described["OptimizationJobStatus"] == "STARTING"
    assert before - 0.01 <= described["CreationTime"] <= time.time()
    assert described["LastModifiedTime"] == described["CreationTime"]
    for absent in ("OptimizationStartTime", "OptimizationEndTime", "FailureReason", "OptimizationOutput", "Tags"):
        assert absent not in described
    wire = request_wire("job-a")
    for member in ("ModelSource", "DeploymentInstanceType", "OptimizationConfigs", "OutputConfig", "RoleArn"):
        assert described[member] == wire[member]
    assert described["StoppingCondition"] == {"MaxRuntimeInSeconds": 3600}
    # Tags are kept, just not echoed.
    assert service.get("job-a").tags == TAGS


def test_arn_uses_configured_region_and_account(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("OPTJOB_ACCOUNT_ID", "210987654321")
    service = JobService(start_executor=False)
    arn = service.create(make_request("Mixed-Case-1")).optimization_job_arn
    assert arn == "arn:aws:sagemaker:eu-west-1:210987654321:optimization-job/Mixed-Case-1"


def test_describe_echoes_optional_members(service: JobService) -> None:
    wire = request_wire(
        "job-opt",
        MaxInstanceCount=2,
        OptimizationEnvironment={"OPTION_DTYPE": "fp16"},
        VpcConfig={"SecurityGroupIds": ["sg-1"], "Subnets": ["subnet-1"]},
    )
    service.handle("CreateOptimizationJob", wire)
    described = service.handle("DescribeOptimizationJob", {"OptimizationJobName": "job-opt"})
    for member in ("MaxInstanceCount", "OptimizationEnvironment", "VpcConfig"):
        assert described[member] == wire[member]


def test_duplicate_name_is_resource_in_use(service: JobService) -> None:
    service.create(make_request("dup"))
    with pytest.raises(ResourceInUse, match="already exists"):
        service.create(make_request("dup"))


def test_active_limit_is_resource_limit_exceeded(service: JobService) -> None:
    for index in range(5):  # settings fixture: max_active_jobs=5
        service.create(make_request(f"busy-{index}"))
    with pytest.raises(ResourceLimitExceeded, match="is 5 Jobs, with current utilization of 5 Jobs"):
        service.create(make_request("one-too-many"))
    # Terminal jobs do not count.
    fail(service.store, "busy-0", "done")
    service.create(make_request("fits-now"))


def test_invalid_request_is_rejected_before_storing(service: JobService) -> None:
    # Schema violation (the wire contract) and a planner rule (sharding is exclusive).
    with pytest.raises(ValidationException, match="validation error"):
        service.handle("CreateOptimizationJob", request_wire("bad-1", DeploymentInstanceType="ml.m5.large"))
    configs = [{"ModelCompilationConfig": {}}, {"ModelShardingConfig": {}}]
    with pytest.raises(ValidationException, match="ModelShardingConfig cannot be combined"):
        service.create(make_request("bad-2", OptimizationConfigs=configs))
    assert service.store.active() == []
    with pytest.raises(ResourceNotFound):
        service.describe("bad-2")


def test_sagemaker_model_source_must_be_registered(service: JobService) -> None:
    source = {"SageMakerModel": {"ModelName": "llama-base"}}
    with pytest.raises(ValidationException, match="not a registered model"):
        service.create(make_request("by-name", ModelSource=source))
    service.register_model("llama-base", "s3://models-bucket/llama/")
    service.create(make_request("by-name", ModelSource=source))
    plan = json.loads(service.get("by-name").plan_json)
    assert plan["source"]["s3_uri"] == "s3://models-bucket/llama/"  # resolved once, at Create
    assert [m.name for m in service.list_models()] == ["llama-base"]
    with pytest.raises(ValidationException):
        service.register_model("bad name!", "s3://models-bucket/x/")


def test_unknown_names_are_resource_not_found(service: JobService) -> None:
    for operation in ("DescribeOptimizationJob", "StopOptimizationJob", "DeleteOptimizationJob"):
        with pytest.raises(ResourceNotFound, match="Could not find optimization job 'ghost'"):
            service.handle(operation, {"OptimizationJobName": "ghost"})


def test_stop_moves_to_stopping_and_is_idempotent(service: JobService) -> None:
    service.create(make_request("to-stop"))
    created = service.get("to-stop")
    assert service.handle("StopOptimizationJob", {"OptimizationJobName": "to-stop"}) == {}
    record = service.get("to-stop")
    assert (record.status, record.stop_reason) == ("STOPPING", "user")
    assert record.last_modified_time >= created.last_modified_time
    service.stop("to-stop")  # a retried Stop succeeds and changes nothing
    assert service.get("to-stop").last_modified_time == record.last_modified_time


@pytest.mark.parametrize("status", ["COMPLETED", "FAILED", "STOPPED"])
def test_stop_of_terminal_job_is_validation_exception(service: JobService, status: str) -> None:
    service.create(make_request("ended"))
    service.store.transition("ended", expect=("STARTING",), to=status)
    with pytest.raises(ValidationException, match=f"already ended with status {status}"):
        service.stop("ended")


@pytest.mark.parametrize("status", ["STARTING", "INPROGRESS", "STOPPING"])
def test_delete_of_active_job_is_validation_exception(service: JobService, status: str) -> None:
    service.create(make_request("busy"))
    service.store.transition("busy", expect=("STARTING",), to=status)
    with pytest.raises(ValidationException, match=f"is {status}; only a job in a terminal state"):
        service.delete("busy")
    assert service.get("busy").status == status


def test_delete_removes_record_but_not_log(service: JobService) -> None:
    service.create(make_request("gone"))
    log_path = Path(service.get("gone").log_path)
    fail(service.store, "gone", "no luck")
    assert service.handle("DeleteOptimizationJob", {"OptimizationJobName": "gone"}) == {}
    with pytest.raises(ResourceNotFound):
        service.describe("gone")
    assert log_path.exists()
    # The name can be used again; the new job gets its own log file.
    service.create(make_request("gone"))
    assert Path(service.get("gone").log_path) != log_path


def test_terminal_members_in_describe(service: JobService) -> None:
    service.create(make_request("failing"))
    service.store.transition("failing", expect=("STARTING",), to="INPROGRESS", start_time=time.time())
    described = service.describe("failing").dump()
    assert "OptimizationStartTime" in described and "OptimizationEndTime" not in described
    fail(service.store, "failing", "x" * 5000)
    described = service.describe("failing").dump()
    assert len(described["FailureReason"]) == MAX_FAILURE_REASON
    assert described["OptimizationEndTime"] == described["LastModifiedTime"]
    assert "OptimizationOutput" not in described

    service.create(make_request("fine"))
    service.store.transition("fine", expect=("STARTING",), to="COMPLETED", output_image="img:1")
    described = service.describe("fine").dump()
    assert described["OptimizationOutput"] == {"RecommendedInferenceImage": "img:1"}
    assert "FailureReason" not in described


def test_handle_rejects_unknown_operation_and_bad_bodies(service: JobService) -> None:
    with pytest.raises(UnknownOperationException):
        service.handle("CreateTrainingJob", {})
    with pytest.raises(ValidationException, match="Value null at 'optimizationJobName'"):
        service.handle("DescribeOptimizationJob", {})


def test_newer_schema_is_refused(home: Path) -> None:
    settings = load_settings()
    store = Store(settings.db_path)
    with store.transaction() as conn:
        conn.execute("PRAGMA user_version=99")
    store.close()
    with pytest.raises(Exception, match="schema version 99"):
        Store(settings.db_path)
