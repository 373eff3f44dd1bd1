"""The five optimization-job operations' shapes, current to botocore 1.44.5: the contract, nothing else.

Each model mirrors one botocore shape (named in ``__shape__``); each field carries the
constraint marker of its member's shape (``optjob.api.constraints``) so validation reproduces
SageMaker's rules exactly and ``tests/test_conformance.py`` can compare every member with the
installed botocore model. Field names are snake_case with the wire's PascalCase as alias;
``dump`` writes exactly the JSON that boto3 sends and expects (epoch-second timestamps).
Semantic rules that are not in the botocore model (e.g. ModelSource needs exactly one source)
live in the planner, not here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic.alias_generators import to_pascal

from optjob.api.constraints import (
    BoolRule,
    EnumRule,
    IntRule,
    ListRule,
    MapRule,
    StrRule,
    TimestampRule,
    constraint_error,
)

# --- scalar shapes -------------------------------------------------------------------------

INSTANCE_TYPES: tuple[str, ...] = (
    "ml.p4d.24xlarge", "ml.p4de.24xlarge", "ml.p5.48xlarge", "ml.p5e.48xlarge", "ml.p5en.48xlarge",
    "ml.g4dn.xlarge", "ml.g4dn.2xlarge", "ml.g4dn.4xlarge", "ml.g4dn.8xlarge", "ml.g4dn.12xlarge",
    "ml.g4dn.16xlarge",
    "ml.g5.xlarge", "ml.g5.2xlarge", "ml.g5.4xlarge", "ml.g5.8xlarge", "ml.g5.12xlarge",
    "ml.g5.16xlarge", "ml.g5.24xlarge", "ml.g5.48xlarge",
    "ml.g6.xlarge", "ml.g6.2xlarge", "ml.g6.4xlarge", "ml.g6.8xlarge", "ml.g6.12xlarge",
    "ml.g6.16xlarge", "ml.g6.24xlarge", "ml.g6.48xlarge",
    "ml.g6e.xlarge", "ml.g6e.2xlarge", "ml.g6e.4xlarge", "ml.g6e.8xlarge", "ml.g6e.12xlarge",
    "ml.g6e.16xlarge", "ml.g6e.24xlarge", "ml.g6e.48xlarge",
    "ml.inf2.xlarge", "ml.inf2.8xlarge", "ml.inf2.24xlarge", "ml.inf2.48xlarge",
    "ml.trn1.2xlarge", "ml.trn1.32xlarge", "ml.trn1n.32xlarge", "ml.p6-b200.48xlarge",
    "ml.g7e.2xlarge", "ml.g7e.4xlarge", "ml.g7e.8xlarge", "ml.g7e.12xlarge", "ml.g7e.24xlarge",
    "ml.g7e.48xlarge",
    "ml.g7.2xlarge", "ml.g7.4xlarge", "ml.g7.8xlarge", "ml.g7.12xlarge", "ml.g7.24xlarge",
    "ml.g7.48xlarge",
)  # fmt: skip

JOB_STATUSES: tuple[str, ...] = ("INPROGRESS", "COMPLETED", "FAILED", "STARTING", "STOPPING", "STOPPED")
TERMINAL_STATUSES = frozenset({"COMPLETED", "FAILED", "STOPPED"})

EntityName = Annotated[str, StrRule("EntityName", 1, 63, r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")]
RoleArn = Annotated[
    str, StrRule("RoleArn", 20, 2048, r"arn:aws[a-z\-]*:iam::\d{12}:role/?[a-zA-Z_0-9+=,.@\-_/]+")
]
S3Uri = Annotated[str, StrRule("S3Uri", 0, 1024, r"(https|s3)://([^/]+)/?(.*)")]
KmsKeyId = Annotated[str, StrRule("KmsKeyId", 0, 2048, r"[a-zA-Z0-9:/_-]*")]
ModelName = Annotated[str, StrRule("ModelName", 0, 63, r"[a-zA-Z0-9]([\-a-zA-Z0-9]*[a-zA-Z0-9])?")]
ContainerImage = Annotated[str, StrRule("OptimizationContainerImage", 0, 255, r"[\S]+")]
FailureReason = Annotated[str, StrRule("FailureReason", 0, 1024)]
JobArn = Annotated[
    str,
    StrRule(
        "OptimizationJobArn",
        0,
        256,
        r"arn:aws[a-z\-]*:sagemaker:[a-z0-9\-]*:[0-9]{12}:optimization-job/.*",
    ),
]
TrainingPlanArn = Annotated[
    str,
    StrRule(
        "TrainingPlanArn",
        50,
        2048,
        r"arn:aws[a-z\-]*:sagemaker:[a-z0-9\-]*:[0-9]{12}:training-plan/.*",
    ),
]
NameContains = Annotated[str, StrRule("NameContains", 0, 63, r"[a-zA-Z0-9\-]+")]
NextToken = Annotated[str, StrRule("NextToken", 0, 8192, r".*")]
TagKey = Annotated[str, StrRule("TagKey", 1, 128, r"([\p{L}\p{Z}\p{N}_.:/=+\-@]*)")]
TagValue = Annotated[str, StrRule("TagValue", 0, 256, r"([\p{L}\p{Z}\p{N}_.:/=+\-@]*)")]
VpcId = Annotated[str, StrRule("OptimizationVpcSecurityGroupId", 0, 32, r"[-0-9a-zA-Z]+")]
SubnetId = Annotated[str, StrRule("OptimizationVpcSubnetId", 0, 32, r"[-0-9a-zA-Z]+")]
OptimizationType = Annotated[str, StrRule("OptimizationType")]

InstanceType = Annotated[str, EnumRule("OptimizationJobDeploymentInstanceType", INSTANCE_TYPES)]
JobStatus = Annotated[str, EnumRule("OptimizationJobStatus", JOB_STATUSES)]
SortBy = Annotated[str, EnumRule("ListOptimizationJobsSortBy", ("Name", "CreationTime", "Status"))]
SortOrder = Annotated[str, EnumRule("SortOrder", ("Ascending", "Descending"))]
SpecTechnique = Annotated[str, EnumRule("ModelSpeculativeDecodingTechnique", ("EAGLE",))]
SpecDataType = Annotated[str, EnumRule("ModelSpeculativeDecodingS3DataType", ("S3Prefix", "ManifestFile"))]

MaxInstanceCount = Annotated[int, IntRule("OptimizationJobMaxInstanceCount", 1)]
MaxRuntime = Annotated[int, IntRule("MaxRuntimeInSeconds", 1)]
MaxWaitTime = Annotated[int, IntRule("MaxWaitTimeInSeconds", 1)]
MaxPendingTime = Annotated[int, IntRule("MaxPendingTimeInSeconds", 1800, 2419200)]
MaxResults = Annotated[int, IntRule("MaxResults", 1, 100)]

AcceptEula = Annotated[bool, BoolRule("OptimizationModelAcceptEula")]

CreationTime = Annotated[datetime, TimestampRule("CreationTime")]
LastModifiedTime = Annotated[datetime, TimestampRule("LastModifiedTime")]
Timestamp = Annotated[datetime, TimestampRule("Timestamp")]

EnvironmentVariables = Annotated[
    dict[str, str],
    MapRule(
        "OptimizationJobEnvironmentVariables",
        key=StrRule("NonEmptyString256", 0, 256, r"(?!\s*$).+"),
        value=StrRule("String256", 0, 256),
        min=0,
        max=25,
    ),
]


# --- structures ----------------------------------------------------------------------------


class Shape(BaseModel):
    """Base of every structure: PascalCase on the wire, unknown members rejected, frozen."""

    model_config = ConfigDict(
        alias_generator=to_pascal,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        strict=True,
    )
    __shape__: ClassVar[str]
    __union__: ClassVar[bool] = False

    def dump(self) -> dict[str, Any]:
        """The wire JSON (as Python objects): aliases, no absent members, epoch timestamps."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class Tag(Shape):
    __shape__ = "Tag"
    key: TagKey
    value: TagValue


class OptimizationModelAccessConfig(Shape):
    __shape__ = "OptimizationModelAccessConfig"
    accept_eula: AcceptEula


class OptimizationJobModelSourceS3(Shape):
    __shape__ = "OptimizationJobModelSourceS3"
    s3_uri: S3Uri | None = None
    model_access_config: OptimizationModelAccessConfig | None = None


class OptimizationSageMakerModel(Shape):
    __shape__ = "OptimizationSageMakerModel"
    model_name: ModelName | None = None


class OptimizationJobModelSource(Shape):
    __shape__ = "OptimizationJobModelSource"
    s3: OptimizationJobModelSourceS3 | None = None
    sage_maker_model: OptimizationSageMakerModel | None = None


class ModelQuantizationConfig(Shape):
    __shape__ = "ModelQuantizationConfig"
    image: ContainerImage | None = None
    override_environment: EnvironmentVariables | None = None


class ModelCompilationConfig(Shape):
    __shape__ = "ModelCompilationConfig"
    image: ContainerImage | None = None
    override_environment: EnvironmentVariables | None = None


class ModelShardingConfig(Shape):
    __shape__ = "ModelShardingConfig"
    image: ContainerImage | None = None
    override_environment: EnvironmentVariables | None = None


class ModelSpeculativeDecodingTrainingDataSource(Shape):
    __shape__ = "ModelSpeculativeDecodingTrainingDataSource"
    s3_uri: S3Uri
    s3_data_type: SpecDataType


class ModelSpeculativeDecodingConfig(Shape):
    __shape__ = "ModelSpeculativeDecodingConfig"
    technique: SpecTechnique
    training_data_source: ModelSpeculativeDecodingTrainingDataSource | None = None


class OptimizationConfig(Shape):
    """A union: each list element sets exactly one technique member."""

    __shape__ = "OptimizationConfig"
    __union__ = True
    model_quantization_config: ModelQuantizationConfig | None = None
    model_compilation_config: ModelCompilationConfig | None = None
    model_sharding_config: ModelShardingConfig | None = None
    model_speculative_decoding_config: ModelSpeculativeDecodingConfig | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> OptimizationConfig:
        chosen = self.members_set()
        if len(chosen) != 1:
            names = ", ".join(UNION_MEMBERS)
            found = "none" if not chosen else ", ".join(chosen)
            raise constraint_error(
                f"Member must have exactly one of the following members set: {names} (found {found})"
            )
        return self

    def members_set(self) -> list[str]:
        return [alias for alias, attr in UNION_MEMBERS.items() if getattr(self, attr) is not None]

    @property
    def technique(self) -> str:
        """The wire name of the one member set, e.g. ``ModelQuantizationConfig``."""
        return self.members_set()[0]

    @property
    def config(self) -> Shape:
        return getattr(self, UNION_MEMBERS[self.technique])


UNION_MEMBERS: dict[str, str] = {
    "ModelQuantizationConfig": "model_quantization_config",
    "ModelCompilationConfig": "model_compilation_config",
    "ModelShardingConfig": "model_sharding_config",
    "ModelSpeculativeDecodingConfig": "model_speculative_decoding_config",
}


class OptimizationJobOutputConfig(Shape):
    __shape__ = "OptimizationJobOutputConfig"
    kms_key_id: KmsKeyId | None = None
    s3_output_location: S3Uri
    sage_maker_model: OptimizationSageMakerModel | None = None


class StoppingCondition(Shape):
    __shape__ = "StoppingCondition"
    max_runtime_in_seconds: MaxRuntime | None = None
    max_wait_time_in_seconds: MaxWaitTime | None = None
    max_pending_time_in_seconds: MaxPendingTime | None = None


class OptimizationVpcConfig(Shape):
    __shape__ = "OptimizationVpcConfig"
    security_group_ids: Annotated[list[VpcId], ListRule("OptimizationVpcSecurityGroupIds", 1, 5)]
    subnets: Annotated[list[SubnetId], ListRule("OptimizationVpcSubnets", 1, 16)]


class OptimizationOutput(Shape):
    __shape__ = "OptimizationOutput"
    recommended_inference_image: ContainerImage | None = None


OptimizationConfigs = Annotated[list[OptimizationConfig], ListRule("OptimizationConfigs", 0, 10)]
TagList = Annotated[list[Tag], ListRule("TagList", 0, 50)]
TrainingPlanArns = Annotated[list[TrainingPlanArn], ListRule("OptimizationJobTrainingPlanArns", 0, 1)]


class CreateOptimizationJobRequest(Shape):
    __shape__ = "CreateOptimizationJobRequest"
    optimization_job_name: EntityName
    role_arn: RoleArn
    model_source: OptimizationJobModelSource
    deployment_instance_type: InstanceType
    max_instance_count: MaxInstanceCount | None = None
    optimization_environment: EnvironmentVariables | None = None
    optimization_configs: OptimizationConfigs
    output_config: OptimizationJobOutputConfig
    stopping_condition: StoppingCondition
    tags: TagList | None = None
    vpc_config: OptimizationVpcConfig | None = None
    training_plan_arns: TrainingPlanArns | None = None


class CreateOptimizationJobResponse(Shape):
    __shape__ = "CreateOptimizationJobResponse"
    optimization_job_arn: JobArn


class DescribeOptimizationJobRequest(Shape):
    __shape__ = "DescribeOptimizationJobRequest"
    optimization_job_name: EntityName


class DescribeOptimizationJobResponse(Shape):
    __shape__ = "DescribeOptimizationJobResponse"
    optimization_job_arn: JobArn
    optimization_job_status: JobStatus
    optimization_start_time: Timestamp | None = None
    optimization_end_time: Timestamp | None = None
    creation_time: CreationTime
    last_modified_time: LastModifiedTime
    failure_reason: FailureReason | None = None
    optimization_job_name: EntityName
    model_source: OptimizationJobModelSource
    optimization_environment: EnvironmentVariables | None = None
    deployment_instance_type: InstanceType
    max_instance_count: MaxInstanceCount | None = None
    optimization_configs: OptimizationConfigs
    output_config: OptimizationJobOutputConfig
    optimization_output: OptimizationOutput | None = None
    role_arn: RoleArn
    stopping_condition: StoppingCondition
    vpc_config: OptimizationVpcConfig | None = None
    training_plan_arns: TrainingPlanArns | None = None


class ListOptimizationJobsRequest(Shape):
    __shape__ = "ListOptimizationJobsRequest"
    next_token: NextToken | None = None
    max_results: MaxResults | None = None
    creation_time_after: CreationTime | None = None
    creation_time_before: CreationTime | None = None
    last_modified_time_after: LastModifiedTime | None = None
    last_modified_time_before: LastModifiedTime | None = None
    optimization_contains: NameContains | None = None
    name_contains: NameContains | None = None
    status_equals: JobStatus | None = None
    sort_by: SortBy | None = None
    sort_order: SortOrder | None = None


class OptimizationJobSummary(Shape):
    __shape__ = "OptimizationJobSummary"
    optimization_job_name: EntityName
    optimization_job_arn: JobArn
    creation_time: CreationTime
    optimization_job_status: JobStatus
    optimization_start_time: Timestamp | None = None
    optimization_end_time: Timestamp | None = None
    last_modified_time: LastModifiedTime | None = None
    deployment_instance_type: InstanceType
    max_instance_count: MaxInstanceCount | None = None
    optimization_types: Annotated[list[OptimizationType], ListRule("OptimizationTypes")]


class ListOptimizationJobsResponse(Shape):
    __shape__ = "ListOptimizationJobsResponse"
    optimization_job_summaries: Annotated[list[OptimizationJobSummary], ListRule("OptimizationJobSummaries")]
    next_token: NextToken | None = None


class StopOptimizationJobRequest(Shape):
    __shape__ = "StopOptimizationJobRequest"
    optimization_job_name: EntityName


class DeleteOptimizationJobRequest(Shape):
    __shape__ = "DeleteOptimizationJobRequest"
    optimization_job_name: EntityName


class _ErrorShape(Shape):
    message: FailureReason | None = None


class ResourceInUse(_ErrorShape):
    __shape__ = "ResourceInUse"


class ResourceLimitExceeded(_ErrorShape):
    __shape__ = "ResourceLimitExceeded"


class ResourceNotFound(_ErrorShape):
    __shape__ = "ResourceNotFound"


OPERATIONS: dict[str, tuple[type[Shape], type[Shape] | None]] = {
    "CreateOptimizationJob": (CreateOptimizationJobRequest, CreateOptimizationJobResponse),
    "DescribeOptimizationJob": (DescribeOptimizationJobRequest, DescribeOptimizationJobResponse),
    "ListOptimizationJobs": (ListOptimizationJobsRequest, ListOptimizationJobsResponse),
    "StopOptimizationJob": (StopOptimizationJobRequest, None),
    "DeleteOptimizationJob": (DeleteOptimizationJobRequest, None),
}

ERROR_SHAPES: tuple[type[Shape], ...] = (ResourceInUse, ResourceLimitExceeded, ResourceNotFound)
