"""Running one quantization stage the way a job's pipeline does, for tests at the technique's edge."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from optjob.pipeline.stage import StageContext, StageResult, technique_for
from optjob.targets.catalog import instance


class QuantizationConfig(BaseModel):
    Image: str | None = None


def run_quantization_stage(
    model: Path, env: dict[str, str], tmp_path: Path, target: str = "ml.g6.12xlarge"
) -> StageResult:
    """Plan and run ``ModelQuantizationConfig`` with ``env`` on ``model``; output in ``tmp_path/out``."""
    tech = technique_for("ModelQuantizationConfig")
    spec = instance(target)
    stage = tech.plan(QuantizationConfig(), env, spec, path="OptimizationConfigs[0]")
    ctx = StageContext(
        job_name="t", input_dir=model, output_dir=tmp_path / "out", work_dir=tmp_path / "work", target=spec
    )
    return tech.run(stage, ctx)
