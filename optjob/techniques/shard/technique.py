"""``ShardingTechnique``: the ModelShardingConfig plug-in.

plan(): the degree against the target's GPUs, OPTION_DTYPE, serving.properties for
``--load-format sharded_state``. run: ``config.json`` is checked first (architecture, quantization,
dtype, vLLM's divisibility rules) so a model that cannot be sharded fails before any weight is
read; then the weights stream through ``writer`` into per-rank part files, each checked by the gate
(``check``) as soon as it closes and only then uploaded, and the non-weight files travel unchanged.
Nothing is a finished model until the manifest is written; a failure removes what was uploaded.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from optjob.errors import InputError
from optjob.package.model_config import set_config_dtype
from optjob.package.serving import properties_from_env, write_serving_properties
from optjob.pipeline.env import tensor_parallel_degree
from optjob.pipeline.stage import (
    PlanError,
    PlannedStage,
    StageContext,
    StageNeeds,
    StageResult,
    StreamingTechnique,
    register,
)
from optjob.runtime.usage import peak_rss_mib
from optjob.storage.inputs import SAFETENSORS_INDEX, weight_files
from optjob.targets.catalog import InstanceSpec
from optjob.techniques.shard import layout

_DTYPES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _dtype_option(env: Mapping[str, str], path: str) -> str | None:
    raw = (env.get("OPTION_DTYPE") or "auto").strip().lower()
    if raw == "auto":
        return None
    if raw not in _DTYPES:
        raise PlanError(
            f"OPTION_DTYPE='{raw}' at '{path}' cannot be used for sharding: sharded_state files are served as "
            "stored, so use bf16, fp16, or auto (the checkpoint's own dtype)"
        )
    return _DTYPES[raw]


@register
class ShardingTechnique(StreamingTechnique):
    config_member = "ModelShardingConfig"
    optimization_type = "Sharding"

    def plan(self, config: BaseModel, env: Mapping[str, str], target: InstanceSpec, *, path: str) -> PlannedStage:
        env = dict(env)
        degree = tensor_parallel_degree(env, target, path=path, required=True)
        dtype = _dtype_option(env, path)
        serving = properties_from_env(env)
        serving.update({"option.load_format": "sharded_state", "option.tensor_parallel_degree": str(degree)})
        if dtype:
            serving["option.dtype"] = dtype
        return PlannedStage(
            technique=self.config_member,
            optimization_type=self.optimization_type,
            engine="optjob-shard",
            params={
                "tensor_parallel_degree": degree,
                "dtype": dtype,
                "vllm_version": layout.vllm_version(),
                "part_max_bytes": int(layout.rules()["vllm"]["part_max_bytes"]),
            },
            env=env,
            image=getattr(config, "image", None),
            image_framework="vllm-sharded-state",
            needs=StageNeeds(whole_model_in_memory=False),
            serving_properties=serving,
        )

    def run(self, stage: PlannedStage, ctx: StageContext) -> StageResult:
        src = Path(ctx.input_dir)

        def shards() -> Iterator[Path]:  # listed on first use, after config.json has been checked
            try:
                yield from weight_files(src)
            except FileNotFoundError:
                raise InputError(
                    f"the model source has no *.safetensors weights (looked in {src}); sharding reads safetensors "
                    "only, so convert the checkpoint with transformers' save_pretrained first"
                ) from None

        return self.run_streaming(stage, ctx, shards(), lambda path: None)

    def run_streaming(
        self,
        stage: PlannedStage,
        ctx: StageContext,
        weights: Iterable[Path],
        on_output: Callable[[Path], None],
    ) -> StageResult:
        from optjob.techniques.shard.check import GateFigures, check_file
        from optjob.techniques.shard.writer import SourceTensors, write_parts

        started = time.monotonic()
        src, out = Path(ctx.input_dir), Path(ctx.output_dir)
        degree = int(stage.params["tensor_parallel_degree"])
        geo = self.model_geometry(src, degree, stage.params.get("dtype"), ctx.target)
        out.mkdir(parents=True, exist_ok=True)
        self._copy_non_weights(src, out)
        if stage.params.get("dtype"):
            set_config_dtype(out, stage.params["dtype"])
        write_serving_properties(out, stage.serving_properties, comments=self.serving_notes(degree))
        kv = "replicated" if geo.kv_heads < degree else "split"
        ctx.events("shard", "plan", 0.0,
                   f"{geo.architecture}: {geo.layers} layers, {degree} ranks, vocabulary {geo.vocab} padded to "
                   f"{geo.padded_vocab}, {geo.kv_heads} KV heads ({kv})")  # fmt: skip

        figures = GateFigures()
        source = SourceTensors(weights)

        def file_done(path: Path, rank: int, entries: list[layout.Entry]) -> None:
            t0 = time.monotonic()
            check_file(path, rank, entries, geo, degree, source, figures)  # nothing leaves unchecked
            figures.seconds += time.monotonic() - t0
            on_output(path)

        try:
            report = write_parts(
                source, geo, degree, out, part_max_bytes=int(stage.params["part_max_bytes"]),
                on_file=file_done, cancel=ctx.cancel, events=ctx.events,
            )  # fmt: skip
            unused = source.unused(geo)
        finally:
            source.close()
        if unused:
            raise InputError(
                f"the checkpoint holds {len(unused)} tensors vLLM's {geo.architecture} has no place for "
                f"(first: {unused[0]}); vLLM would refuse to load it. Remove them or check the architecture in "
                "config.json"
            )
        metrics = {
            "vllm_layout_version": layout.vllm_version(),
            "tensor_parallel_degree": degree,
            "architecture": geo.architecture,
            "dtype": geo.dtype,
            "vocab_size": geo.vocab,
            "padded_vocab_size": geo.padded_vocab,
            "kv_heads": geo.kv_heads,
            "kv_replicated": geo.kv_heads < degree,
            "tied_embeddings": geo.tied,
            "parts_per_rank": len(report.parts),
            "tensors_per_rank": report.tensors_per_rank,
            "bytes_per_rank": report.bytes_per_rank,
            "files": [path.name for part in report.parts for path in part.paths],
            "gate": {
                "passed": True,
                "files_checked": figures.files_checked,
                "tensors_checked": figures.tensors_checked,
                "bytes_read_back": figures.bytes_read_back,
                "seconds": round(figures.seconds, 3),
            },
            "seconds": round(time.monotonic() - started, 3),
            "peak_rss_mib": round(peak_rss_mib(), 1),
        }
        ctx.events("shard", "done", 1.0,
                   f"{len(report.parts)} part(s) x {degree} ranks; every rank file read back and matched to the "
                   "source bit for bit")  # fmt: skip
        return StageResult(metrics=metrics, warnings=list(stage.warnings),
                           serving_properties=dict(stage.serving_properties))  # fmt: skip

    def model_problems(self, stage: PlannedStage, config: Mapping[str, Any], target: InstanceSpec) -> list[str]:
        try:
            self.check_model(config, int(stage.params["tensor_parallel_degree"]), stage.params.get("dtype"), target)
        except InputError as exc:
            return [str(exc)]
        return []

    @classmethod
    def model_geometry(cls, src: Path, degree: int, dtype: str | None, target: InstanceSpec) -> layout.Geometry:
        """The model's geometry, or InputError before any weight is read (naming the numbers and the fix)."""
        config_path = src / "config.json"
        if not config_path.is_file():
            raise InputError(f"the model source has no config.json (looked in {src}); add it to the model directory")
        return cls.check_model(json.loads(config_path.read_text()), degree, dtype, target)

    @staticmethod
    def check_model(config: Mapping[str, Any], degree: int, dtype: str | None, target: InstanceSpec) -> layout.Geometry:
        geo = layout.geometry(config, dtype=dtype)
        problems = layout.degree_problems(geo, degree)
        if problems:
            devices = target.accelerator_count
            fits = [d for d in range(1, devices + 1) if devices % d == 0 and not layout.degree_problems(geo, d)]
            hint = f"use one of {', '.join(map(str, fits))}" if fits else "this model cannot be split on this target"
            raise InputError(
                f"OPTION_TENSOR_PARALLEL_DEGREE={degree} does not fit {geo.architecture}: "
                + "; ".join(problems)
                + f". For {target.name} ({devices} GPUs) {hint}"
            )
        return geo

    @staticmethod
    def serving_notes(degree: int) -> list[str]:
        version = layout.vllm_version()
        return [
            f"vLLM sharded_state checkpoint for tensor parallel degree {degree}, in vLLM {version}'s per-rank layout.",
            f"Serve with vLLM {version} (--load-format sharded_state --tensor-parallel-size {degree}); other vLLM",
            "versions may hold other tensors per rank, and a mismatch loads silently wrong. See optjob-manifest.json.",
        ]

    @staticmethod
    def _copy_non_weights(src: Path, out: Path) -> None:
        """Config, tokenizer, generation config: everything but weights and the source's weight index
        (which names files this directory does not hold)."""
        for item in src.iterdir():
            if item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES) and item.name != SAFETENSORS_INDEX:
                shutil.copy2(item, out / item.name)
