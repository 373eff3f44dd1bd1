"""ModelSpeculativeDecodingConfig: EAGLE-3 draft heads trained from the job's TrainingDataSource."""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel

from optjob.pipeline.env import env_to_properties
from optjob.pipeline.stage import PlannedStage, StageContext, StageNeeds, StageResult, Technique, register
from optjob.targets.catalog import InstanceSpec
from optjob.techniques._pending import driver_not_in_build


@register
class SpeculativeDecodingTechnique(Technique):
    config_member = "ModelSpeculativeDecodingConfig"
    optimization_type = "SpeculativeDecoding"

    def plan(
        self, config: BaseModel, env: Mapping[str, str], target: InstanceSpec, *, path: str
    ) -> PlannedStage:
        source = getattr(config, "training_data_source", None)
        params = {
            "technique": config.technique,
            "training_data": source.s3_uri if source else "built-in datasets",
            "training_data_type": source.s3_data_type if source else None,
        }
        return PlannedStage(
            technique=self.config_member,
            optimization_type=self.optimization_type,
            engine="eagle3",
            params={k: v for k, v in params.items() if v is not None},
            env=dict(env),
            image_framework="lmi",
            needs=StageNeeds(accelerator=True, calibration_data=True),
            serving_properties=env_to_properties(env),
        )

    def run(self, stage: PlannedStage, ctx: StageContext) -> StageResult:
        raise driver_not_in_build(self.config_member, "EAGLE-3 draft-head trainer")
