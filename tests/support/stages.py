"""Running one quantization stage the way a job's pipeline does, for tests at the technique's edge."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from safetensors import safe_open
from safetensors.torch import save_file

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


def scramble_packed_weights(directory: Path) -> None:
    """Reorder the bytes of every packed 4-bit weight in ``directory``'s safetensors files.

    This is the corruption bitsandbytes' CPU backend causes when a model is saved after a forward
    pass (it repacks NF4 weights into its own layout on AVX-512 hosts; other CPUs keep the layout),
    made here on purpose so the gate is tested against it on every machine. The quantization state
    (absmax, quant map) is left as saved, exactly as in the real bug.
    """
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 - not a dict
        for name, tensor in tensors.items():
            if name.endswith(".weight") and tensor.dtype == torch.uint8:
                tensors[name] = tensor.flatten().flip(0).reshape(tensor.shape).contiguous()
        save_file(tensors, str(path), metadata=metadata)


def bnb_saving_scrambled(original: Callable[..., Any]) -> Callable[..., Any]:
    """``engines.bnb_quantize`` whose output carries the save-after-forward corruption."""

    def quantize(input_dir: Path, output_dir: Path, *args: Any, **kwargs: Any) -> Any:
        result = original(input_dir, output_dir, *args, **kwargs)
        scramble_packed_weights(output_dir)
        return result

    return quantize


def fp8_job_request(name: str, source: str, output: str, scheme: str = "FP8_DYNAMIC") -> dict[str, Any]:
    """A CreateOptimizationJob request (wire shape) for a data-free FP8 job, the streaming path's job."""
    return {
        "OptimizationJobName": name,
        "RoleArn": "arn:aws:iam::111122223333:role/x",
        "ModelSource": {"S3": {"S3Uri": source}},
        "DeploymentInstanceType": "ml.g6.12xlarge",
        "OptimizationConfigs": [
            {"ModelQuantizationConfig": {"OverrideEnvironment": {"OPTION_QUANTIZE": "fp8",
                                                                 "OPTION_FP8_SCHEME": scheme}}}
        ],
        "OutputConfig": {"S3OutputLocation": output},
        "StoppingCondition": {"MaxRuntimeInSeconds": 900},
    }  # fmt: skip
