"""``QuantizationTechnique``: the ModelQuantizationConfig plug-in (issue #5).

plan(): OPTION_* -> typed parameters, scheme -> engine, capability rules against the target,
tensor-parallel degree against the accelerator count, serving.properties to write.
run():  memory pre-flight -> quantize (streaming / llm-compressor / bitsandbytes) -> tokenizer and
serving.properties -> verification gate. A failed gate moves the output aside and raises
``VerificationFailed``; only a verified directory is left at ``ctx.output_dir``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from optjob.config_files import load_config
from optjob.errors import InputError, VerificationFailed
from optjob.package.model_config import set_config_dtype
from optjob.package.serving import properties_from_env, write_serving_properties
from optjob.pipeline.stage import (
    PlanError,
    PlannedStage,
    StageContext,
    StageNeeds,
    StageResult,
    TensorStreamingTechnique,
    register,
)
from optjob.runtime.usage import PeakRss, peak_rss_mib
from optjob.targets.catalog import InstanceSpec
from optjob.techniques.quantize import rules
from optjob.techniques.quantize.params import QuantizationParams, parse_params

_SERVING_DTYPES = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}


def resolve_engine(params: QuantizationParams) -> dict[str, Any]:
    """Engine, recipe and calibration need for the parameters (configs/quantization.yaml)."""
    cfg = load_config("quantization.yaml")
    scheme = dict(cfg["schemes"][params.quantize])
    key = params.quantize
    if params.quantize == "fp8":
        fp8 = cfg["fp8_schemes"][params.fp8_scheme]
        scheme.update(engine=fp8["engine"], calibration=fp8["calibration"], preset=fp8["preset"])
        if "without_tokenizer" in fp8:
            scheme["without_tokenizer"] = fp8["without_tokenizer"]
        key = params.fp8_scheme.lower()
    scheme["verify_key"] = key
    return scheme


@register
class QuantizationTechnique(TensorStreamingTechnique):
    config_member = "ModelQuantizationConfig"
    optimization_type = "Quantization"

    def plan(
        self,
        config: BaseModel,
        env: Mapping[str, str],
        target: InstanceSpec,
        *,
        path: str,
    ) -> PlannedStage:
        params = parse_params(env, path=path)
        scheme = resolve_engine(params)
        decision = rules.evaluate(params.quantize, env, params.dtype, target, path=path)
        tp = params.tensor_parallel_degree
        if tp is not None and (tp > target.accelerator_count or target.accelerator_count % tp):
            raise PlanError(
                f"OPTION_TENSOR_PARALLEL_DEGREE={tp} at {path}: must divide the accelerator count of "
                f"{target.name} ({target.accelerator_count} x {target.accelerator})"
            )
        serving = properties_from_env(env)
        serving.update({k: str(v) for k, v in scheme.get("serving", {}).items()})
        if scheme["engine"] == "bitsandbytes":
            serving.pop("option.quantize", None)
        if decision.dtype != "auto":
            serving["option.dtype"] = _SERVING_DTYPES[decision.dtype]
        if params.kv_cache_dtype != "auto":
            serving["option.kv_cache_dtype"] = params.kv_cache_dtype
        return PlannedStage(
            technique=self.config_member,
            optimization_type=self.optimization_type,
            engine=str(scheme["engine"]),
            params={
                "options": params.model_dump(mode="json"),
                "scheme": scheme,
                "dtype": decision.dtype,
                "rules_applied": decision.applied,
            },
            env=dict(env),
            image=getattr(config, "image", None),
            image_framework="lmi",
            needs=StageNeeds(
                calibration_data=bool(scheme["calibration"]),
                whole_model_in_memory=scheme["engine"] != "streaming",
            ),
            warnings=tuple(decision.warnings),
            serving_properties=serving,
        )

    def run(self, stage: PlannedStage, ctx: StageContext) -> StageResult:
        return self._run(stage, ctx, weights=None, on_output=None)

    def run_streaming(
        self,
        stage: PlannedStage,
        ctx: StageContext,
        weights: Iterable[Path],
        on_output: Callable[[Path], None],
    ) -> StageResult:
        """Data-free schemes only: each shard is quantized as it lands, handed over, and checked."""
        if stage.engine != "streaming":
            raise InputError(f"the {stage.engine} engine needs the whole model; it cannot run shard by shard")
        return self._run(stage, ctx, weights=weights, on_output=on_output)

    def _run(
        self,
        stage: PlannedStage,
        ctx: StageContext,
        *,
        weights: Iterable[Path] | None,
        on_output: Callable[[Path], None] | None,
    ) -> StageResult:
        from optjob.techniques.quantize import engines, streaming
        from optjob.verify.gate import per_tensor_mode
        from optjob.verify.tensors import quantization_config

        params, scheme, dtype, linear, fit, started = _prepare(stage, ctx)
        src, out = Path(ctx.input_dir), Path(ctx.output_dir)
        timings: dict[str, float] = {}

        texts = None
        if scheme["calibration"]:
            from optjob.techniques.quantize.calibration import load_texts

            texts = load_texts(params.calib_dataset, storage=ctx.storage)
        cap = int(load_config("quantization.yaml")["calibration"]["max_seq_len_cap"])
        max_seq = min(params.max_model_len, cap)

        t0 = time.monotonic()
        engine = stage.engine
        details: dict[str, Any] = {}
        shard_figures = None
        if engine == "streaming":
            from optjob.techniques.quantize.shard_checks import ShardChecker

            checker = ShardChecker(lambda: quantization_config(out), per_tensor_mode(scheme["verify_key"]))

            def shard_done(done: streaming.ShardDone) -> None:
                if on_output is not None:
                    on_output(done.output)  # upload and check overlap; the verdict comes at the end
                checker.submit(done.source, done.output)

            try:
                result = streaming.quantize_checkpoint(
                    src,
                    out,
                    preset=scheme["preset"],
                    ignore=params.ignore,
                    dtype=dtype,
                    shards=weights,
                    on_shard_done=shard_done,
                    cancel=ctx.cancel,
                    events=ctx.events,
                )
                shard_figures = checker.finish()
            except BaseException:
                checker.abort()
                raise
            timings["shard_checks_s"] = round(checker.seconds, 3)
            details = {"shards": len(result.shards), "quantized_modules": len(result.quantized_modules)}
        elif engine == "llmcompressor":
            details = engines.llmcompressor_quantize(
                src,
                out,
                params,
                scheme,
                texts=texts,
                dtype=dtype,
                max_seq_len=max_seq,
                events=ctx.events,
                cancel=ctx.cancel,
            )
            if dtype != "auto":
                set_config_dtype(out, dtype)
        elif engine == "bitsandbytes":
            details = engines.bnb_quantize(src, out, params, dtype=dtype)
        else:
            raise InputError(f"unknown quantization engine {engine!r}")
        timings["quantize_s"] = round(time.monotonic() - t0, 3)
        return self._finish(stage, ctx, params, scheme, dtype, fit, details, timings, started, shard_figures)

    def import_libraries(self) -> None:
        import compressed_tensors.compressors  # noqa: F401
        import llmcompressor.entrypoints.model_free.converter  # noqa: F401
        import transformers.initialization  # noqa: F401

    def run_tensor_streaming(
        self,
        stage: PlannedStage,
        ctx: StageContext,
        shards: Iterable[Any],
        open_output: Callable[[str, Any], Any],
    ) -> StageResult:
        """Data-free schemes, a tensor at a time: output headers planned up front, each weight
        quantized and checked in memory as its bytes arrive, output bytes uploaded as produced."""
        from optjob.runtime.phases import PhaseClock
        from optjob.techniques.quantize import streaming, tensor_stream
        from optjob.verify.tensors import merge

        setup = _stream_setup(stage, ctx)
        params, scheme, dtype, fit, started = setup.params, setup.scheme, setup.dtype, setup.fit, setup.started
        clock = ctx.clock or PhaseClock()
        t0 = time.monotonic()
        with PeakRss() as stream_memory:
            result = tensor_stream.quantize_stream(
                shards, open_output, quantizer=setup.quantizer, new_checker=setup.new_checker,
                clock=clock, cancel=ctx.cancel,
                events=ctx.events, total_shards=getattr(shards, "count", None),
            )  # fmt: skip
        if result.shards > 1:
            streaming.write_index(Path(ctx.output_dir), result.weight_map, result.total_size)
        timings: dict[str, Any] = {"quantize_s": round(time.monotonic() - t0, 3), "phases_s": clock.seconds()}
        ctx.events("quantize", "phases", None, f"where the time went: {clock.summary()}", phases_s=clock.seconds())
        details = {
            "shards": result.shards,
            "quantized_modules": len(result.quantized_modules),
            "granularity": "tensor",
            "largest_quantized_tensor_mib": round(result.largest_quantized_bytes / 2**20, 1),
            "weights_quantized_in_row_blocks": result.blockwise_weights,
            "stream_rss_at_start_mib": round(stream_memory.start_mib, 1),
            "stream_peak_rss_above_start_mib": round(stream_memory.above_start_mib, 1),
        }
        details["shards_reused_from_an_earlier_attempt"] = result.resumed
        details["shards_made_by_helper_workers"] = result.made_by_helpers
        figures = merge(result.figures)
        return self._finish(stage, ctx, params, scheme, dtype, fit, details, timings, started, figures)

    def run_tensor_units(
        self,
        stage: PlannedStage,
        ctx: StageContext,
        shards: Iterable[Any],
        open_output: Callable[[str, Any], Any],
    ) -> None:
        """The shards a helper worker was given: the same planning, quantization and per-tensor
        checks as ``run_tensor_streaming``; each record goes back to the job's worker with its shard."""
        from optjob.runtime.phases import PhaseClock
        from optjob.techniques.quantize import tensor_stream

        setup = _stream_setup(stage, ctx)
        tensor_stream.quantize_stream(
            shards, open_output, quantizer=setup.quantizer, new_checker=setup.new_checker,
            clock=ctx.clock or PhaseClock(), cancel=ctx.cancel, events=ctx.events,
        )  # fmt: skip

    def _finish(
        self,
        stage: PlannedStage,
        ctx: StageContext,
        params: QuantizationParams,
        scheme: dict[str, Any],
        dtype: str,
        fit: Any,
        details: dict[str, Any],
        timings: dict[str, Any],
        started: float,
        shard_figures: Any,
    ) -> StageResult:
        """Tokenizer and serving files, the verification gate, the stage's figures."""
        from optjob.techniques.quantize import engines
        from optjob.verify.gate import run_gate

        src, out = Path(ctx.input_dir), Path(ctx.output_dir)
        engine = stage.engine
        engines.copy_aux_files(src, out)
        write_serving_properties(out, stage.serving_properties)
        ctx.cancel.raise_if_cancelled()

        t0 = time.monotonic()
        try:
            report = run_gate(
                src, out, scheme["verify_key"], events=ctx.events,
                per_tensor_figures=shard_figures, cancel=ctx.cancel,
            )  # fmt: skip
        except VerificationFailed:
            rejected = Path(ctx.work_dir) / "rejected-output"
            shutil.rmtree(rejected, ignore_errors=True)
            rejected.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(out), str(rejected))
            out.mkdir(parents=True, exist_ok=True)
            raise
        timings["verify_s"] = round(time.monotonic() - t0, 3)
        timings["total_s"] = round(time.monotonic() - started, 3)
        metrics = {
            "scheme": scheme["verify_key"],
            "engine": engine,
            "quantize": params.quantize,
            "dtype": dtype,
            "verification": report.as_dict(),
            "memory_fit": fit.as_dict(),
            "engine_details": details,
            "timings": timings,
            "peak_rss_mib": round(peak_rss_mib(), 1),
        }
        Path(ctx.work_dir).mkdir(parents=True, exist_ok=True)
        (Path(ctx.work_dir) / "quantization-report.json").write_text(json.dumps(metrics, indent=2))
        return StageResult(
            metrics=metrics,
            warnings=[*stage.warnings, *report.notes],
            serving_properties=dict(stage.serving_properties),
        )


@dataclass
class _StreamSetup:
    params: QuantizationParams
    scheme: dict[str, Any]
    dtype: str
    fit: Any
    started: float
    quantizer: Any  # tensor_stream.ShardQuantizer
    new_checker: Callable[[], Any]  # a fresh verify.tensors.StreamChecker per shard


def _stream_setup(stage: PlannedStage, ctx: StageContext) -> _StreamSetup:
    """What quantizing shards tensor by tensor needs, for the job's worker and a helper alike: the
    pre-flight, the output directory's config and the quantizer, and the per-shard checks."""
    from optjob.techniques.quantize import streaming, tensor_stream
    from optjob.verify.gate import per_tensor_mode
    from optjob.verify.tensors import StreamChecker, quantization_config

    if stage.engine != "streaming":
        raise InputError(f"the {stage.engine} engine needs the whole model; it cannot run tensor by tensor")
    params, scheme, dtype, linear, fit, started = _prepare(stage, ctx)
    out = Path(ctx.output_dir)
    config = streaming.prepare_output_dir(Path(ctx.input_dir), out, preset=scheme["preset"], ignore=params.ignore,
                                          dtype=dtype)  # fmt: skip
    qconfig, mode = quantization_config(out), per_tensor_mode(scheme["verify_key"])
    quantizer = tensor_stream.ShardQuantizer(config, linear_modules=linear, dtype=streaming.torch_dtype(dtype))
    return _StreamSetup(params, scheme, dtype, fit, started, quantizer, lambda: StreamChecker(qconfig, mode))


def _prepare(
    stage: PlannedStage, ctx: StageContext
) -> tuple[QuantizationParams, dict[str, Any], str, set[str], Any, float]:
    """Parameters, scheme, dtype, the Linear modules and the memory pre-flight, shared by every engine."""
    from optjob.techniques.quantize import memory, streaming

    params = QuantizationParams(**stage.params["options"])
    scheme: dict[str, Any] = stage.params["scheme"]
    dtype: str = stage.params.get("dtype", "auto")
    src, out = Path(ctx.input_dir), Path(ctx.output_dir)
    if not (src / "config.json").is_file():
        raise InputError(f"the model source has no config.json (looked in {src})")
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    linear = streaming.linear_module_names(src)
    fit = memory.estimate(src, params, ctx.target, linear_modules=linear, ignore=params.ignore, dtype=dtype)
    memory.check_fit(fit, ctx.target)
    ctx.events("quantize", "preflight", 0.0, f"fits: {fit.per_accelerator_gib:.2f} GiB per accelerator")
    ctx.cancel.raise_if_cancelled()
    return params, scheme, dtype, linear, fit, started
