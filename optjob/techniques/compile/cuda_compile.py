"""A CUDA compile stage: memory check, Model Optimizer quantize + export, runtime files, the gate.

Only a directory that passed both checks is left for publishing: ``modelopt_verify`` (every scale
the readers need, names and dtypes) and the shared accuracy gate (weights dequantized with their
own scales, the layer-by-layer replay with FP8 inputs, thresholds ``modelopt_<scheme>`` in
``configs/verify.yaml``); on any failure the runner publishes nothing. The runtime configuration
replaces what an engine used to carry: ``llm_api_options.yaml`` for ``trtllm-serve <dir>
--extra_llm_api_options llm_api_options.yaml`` and ``serving.properties`` for LMI's TensorRT-LLM
container, both from the same OPTION_* limits.
"""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import yaml

from optjob.errors import InfrastructureError, InputError
from optjob.package.serving import write_serving_properties
from optjob.pipeline.stage import PlannedStage, StageContext, StageResult
from optjob.techniques.compile.cuda_plan import CudaCompileParams, cuda_rules, llm_api_options, lmi_properties
from optjob.techniques.compile.modelopt_engine import quantize_and_export, source_dtype
from optjob.techniques.compile.modelopt_verify import verify_modelopt_checkpoint
from optjob.techniques.quantize.calibration import load_texts
from optjob.techniques.quantize.engines import copy_aux_files
from optjob.verify.gate import run_gate

RUNTIME_FILE = "llm_api_options.yaml"
_LOAD_OVERHEAD = 1.3  # Model Optimizer holds the whole model plus its quantizer state


def _check_memory(model_dir: Path) -> int:
    """The worker's RAM must hold the whole model (Model Optimizer loads it at once)."""
    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    needed = int(weights * _LOAD_OVERHEAD)
    available = psutil.virtual_memory().available
    if needed > available:
        raise InfrastructureError(
            f"Model Optimizer loads the whole model: about {needed / 2**30:.1f} GiB for {weights / 2**30:.1f} GiB of "
            f"weights, and this worker has {available / 2**30:.1f} GiB available. Run the job on a worker with more "
            "memory"
        )
    return needed


def run_cuda_compile(params: CudaCompileParams, stage: PlannedStage, ctx: StageContext) -> StageResult:
    scheme = cuda_rules().schemes[params.quantize]
    needed = _check_memory(ctx.input_dir)
    config = json.loads((ctx.input_dir / "config.json").read_text(encoding="utf-8"))
    texts = load_texts(params.calib_dataset, storage=ctx.storage) if scheme.calibrated else []
    try:
        figures = quantize_and_export(
            ctx.input_dir, ctx.output_dir, params, texts=texts, events=ctx.events, cancel=ctx.cancel
        )
    except (ValueError, NotImplementedError, KeyError) as exc:
        architectures = ", ".join(config.get("architectures") or [str(config.get("model_type"))])
        raise InputError(
            f"Model Optimizer {cuda_rules().modelopt} cannot export {architectures} with OPTION_QUANTIZE="
            f"{params.quantize}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    copy_aux_files(ctx.input_dir, ctx.output_dir)
    dtype = figures["dtype"]
    runtime = llm_api_options(params)
    (ctx.output_dir / RUNTIME_FILE).write_text(
        "# trtllm-serve <this directory> --extra_llm_api_options llm_api_options.yaml (written by optjob)\n"
        + yaml.safe_dump(runtime, sort_keys=True),
        encoding="utf-8",
    )
    write_serving_properties(
        ctx.output_dir,
        {**stage.serving_properties, **lmi_properties(params, dtype)},
        comments=[
            f"Model Optimizer {cuda_rules().modelopt} unified checkpoint ({params.quantize}); read by "
            + " and ".join(scheme.consumers),
        ],
    )
    figures["structure"] = verify_modelopt_checkpoint(
        ctx.input_dir,
        ctx.output_dir,
        scheme=params.quantize,
        dtype=dtype,
        kv_fp8=params.kv_cache_quant == "fp8",
        group_size=scheme.group_size or 128,
    )
    if params.quantize != "none":
        figures["verification"] = run_gate(
            ctx.input_dir, ctx.output_dir, f"modelopt_{params.quantize}", events=ctx.events, cancel=ctx.cancel
        ).as_dict()
    figures.update(memory_needed_bytes=needed, runtime=runtime, source_dtype=source_dtype(config))
    return StageResult(metrics=figures)
