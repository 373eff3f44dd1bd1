"""Our shapes read exactly what boto3 sends and write exactly what botocore's parser expects."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import botocore.session
from botocore.parsers import create_parser
from botocore.serialize import create_serializer

from optjob.api.errors import parse
from optjob.api.shapes import (
    CreateOptimizationJobRequest,
    DescribeOptimizationJobResponse,
    ListOptimizationJobsRequest,
    ListOptimizationJobsResponse,
)

SERVICE = botocore.session.get_session().get_service_model("sagemaker")

CREATE = {
    "OptimizationJobName": "job-1",
    "RoleArn": "arn:aws:iam::111122223333:role/service-role/Exec",
    "ModelSource": {"S3": {"S3Uri": "s3://bucket/model/", "ModelAccessConfig": {"AcceptEula": True}}},
    "DeploymentInstanceType": "ml.g6.12xlarge",
    "MaxInstanceCount": 2,
    "OptimizationEnvironment": {"OPTION_TENSOR_PARALLEL_DEGREE": "4"},
    "OptimizationConfigs": [
        {"ModelQuantizationConfig": {"Image": "img:1", "OverrideEnvironment": {"OPTION_QUANTIZE": "fp8"}}},
        {
            "ModelSpeculativeDecodingConfig": {
                "Technique": "EAGLE",
                "TrainingDataSource": {"S3Uri": "s3://bucket/data/", "S3DataType": "ManifestFile"},
            }
        },
    ],
    "OutputConfig": {
        "S3OutputLocation": "s3://bucket/out/",
        "KmsKeyId": "alias/key",
        "SageMakerModel": {"ModelName": "out-model"},
    },
    "StoppingCondition": {
        "MaxRuntimeInSeconds": 3600,
        "MaxWaitTimeInSeconds": 7200,
        "MaxPendingTimeInSeconds": 1800,
    },
    "Tags": [{"Key": "team", "Value": "ml"}],
    "VpcConfig": {"SecurityGroupIds": ["sg-1"], "Subnets": ["subnet-1"]},
    "TrainingPlanArns": ["arn:aws:sagemaker:us-east-1:111122223333:training-plan/my-plan-name"],
}


def _boto3_body(operation: str, params: dict) -> dict:
    request = create_serializer("json").serialize_to_request(params, SERVICE.operation_model(operation))
    assert request["headers"]["X-Amz-Target"] == f"SageMaker.{operation}"
    return json.loads(request["body"])


def test_create_request_round_trips_byte_for_byte_semantics() -> None:
    body = _boto3_body("CreateOptimizationJob", CREATE)
    assert parse(CreateOptimizationJobRequest, body).dump() == body


def test_list_request_timestamps_from_boto3_are_epoch_seconds() -> None:
    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    body = _boto3_body(
        "ListOptimizationJobs",
        {"CreationTimeAfter": moment, "MaxResults": 10, "SortBy": "Name", "SortOrder": "Descending"},
    )
    assert body["CreationTimeAfter"] == int(moment.timestamp())
    parsed = parse(ListOptimizationJobsRequest, body)
    assert parsed.creation_time_after == moment
    assert parsed.dump() == body


def _botocore_parse(operation: str, payload: dict) -> dict:
    model = SERVICE.operation_model(operation)
    response = {"status_code": 200, "headers": {}, "body": json.dumps(payload).encode()}
    return create_parser("json").parse(response, model.output_shape)


def test_describe_response_is_parsed_by_botocore_with_datetimes() -> None:
    created = datetime(2026, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)
    response = DescribeOptimizationJobResponse(
        optimization_job_arn="arn:aws:sagemaker:us-east-1:111122223333:optimization-job/job-1",
        optimization_job_status="COMPLETED",
        creation_time=created,
        last_modified_time=created,
        optimization_start_time=created,
        optimization_end_time=created,
        optimization_job_name="job-1",
        model_source={"S3": {"S3Uri": "s3://bucket/model/"}},
        deployment_instance_type="ml.g6.12xlarge",
        optimization_configs=[{"ModelQuantizationConfig": {}}],
        output_config={"S3OutputLocation": "s3://bucket/out/"},
        optimization_output={"RecommendedInferenceImage": "img:1"},
        role_arn=CREATE["RoleArn"],
        stopping_condition={},
    )
    wire = response.dump()
    assert wire["CreationTime"] == 1778051289.123
    parsed = _botocore_parse("DescribeOptimizationJob", wire)
    assert parsed["CreationTime"] == created
    assert parsed["OptimizationOutput"] == {"RecommendedInferenceImage": "img:1"}
    assert "Tags" not in wire


def test_list_response_is_parsed_by_botocore() -> None:
    now = datetime(2026, 5, 6, tzinfo=UTC)
    response = ListOptimizationJobsResponse(
        optimization_job_summaries=[
            {
                "OptimizationJobName": "job-1",
                "OptimizationJobArn": "arn:aws:sagemaker:us-east-1:111122223333:optimization-job/job-1",
                "CreationTime": now.timestamp(),
                "OptimizationJobStatus": "STARTING",
                "DeploymentInstanceType": "ml.g5.xlarge",
                "OptimizationTypes": ["Quantization"],
            }
        ],
        next_token="abc",
    )
    parsed = _botocore_parse("ListOptimizationJobs", response.dump())
    assert parsed["OptimizationJobSummaries"][0]["CreationTime"] == now
    assert parsed["NextToken"] == "abc"


def test_string_booleans_and_numbers_are_not_coerced() -> None:
    bad = json.loads(json.dumps(CREATE))
    bad["ModelSource"]["S3"]["ModelAccessConfig"]["AcceptEula"] = "true"
    bad["MaxInstanceCount"] = "2"
    from optjob.api.errors import ValidationException

    try:
        parse(CreateOptimizationJobRequest, bad)
    except ValidationException as exc:
        assert (
            "at 'modelSource.s3.modelAccessConfig.acceptEula' failed to satisfy constraint: Member must be a boolean"
            in exc.message
        )
        assert "at 'maxInstanceCount' failed to satisfy constraint: Member must be an integer" in exc.message
    else:
        raise AssertionError("string-typed boolean and integer were accepted")
