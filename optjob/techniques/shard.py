"""ModelShardingConfig: tensor-parallel pre-sharded checkpoints (SageMaker's fast model loading)."""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel

from optjob.pipeline.env import env_to_properties, tensor_parallel_degree
from optjob.pipeline.stage import PlannedStage, StageContext, StageNeeds, StageResult, Technique, register
from optjob.targets.catalog import InstanceSpec
from optjob.techniques._pending import driver_not_in_build


@register
class ShardingTechnique(Technique):
    config_member = "ModelShardingConfig"
    optimization_type = "Sharding"

    def plan(
        self, config: BaseModel, env: Mapping[str, str], target: InstanceSpec, *, path: str
    ) -> PlannedStage:
        env = dict(env)
        degree = tensor_parallel_degree(env, target, path=path, required=True)
        return PlannedStage(
            technique=self.config_member,
            optimization_type=self.optimization_type,
            engine="optjob-shard",
            params={"tensor_parallel_degree": degree},
            env=env,
            image=getattr(config, "image", None),
            image_framework="lmi",
            needs=StageNeeds(whole_model_in_memory=False),
            serving_properties=env_to_properties(env),
        )

    def run(self, stage: PlannedStage, ctx: StageContext) -> StageResult:
        raise driver_not_in_build(self.config_member, "tensor-parallel sharding writer")
