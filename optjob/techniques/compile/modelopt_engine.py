"""NVIDIA Model Optimizer: quantize a Hugging Face model and write its unified checkpoint.

``mtq.quantize`` inserts quantizers and calibrates them with a forward loop over the calibration
samples (the project's calibration data path: ``OPTION_CALIB_DATASET`` or the built-in corpus,
tokenized with the model's tokenizer, or seeded token ids where there is none: FP8 only observes
activation ranges). ``export_hf_checkpoint`` then writes what TensorRT-LLM and vLLM read:
safetensors with FP8 weights and ``weight_scale`` / ``input_scale``, ``config.json`` with
``quantization_config.quant_method: modelopt``, and ``hf_quant_config.json``. (``save_pretrained``
of the fake-quantized model is not that checkpoint.)

CPU pitfalls handled here: the model is loaded in the dtype it will be published in, because
Model Optimizer exports the unquantized tensors (embeddings, norms, LM head) and ``dtype`` as
loaded; the cancel token is checked between calibration samples.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

from optjob.errors import InputError
from optjob.model_tokenizer import load_tokenizer, token_id_sequences
from optjob.runtime.cancel import CancelToken
from optjob.runtime.events import EventSink
from optjob.techniques.compile.cuda_plan import CudaCompileParams, cuda_rules

STAGE = "Compilation"
CALIBRATION_LENGTH = 256


def _config(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / "config.json").read_text(encoding="utf-8"))


def source_dtype(config: dict[str, Any]) -> str:
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def _samples(model_dir: Path, texts: list[str], params: CudaCompileParams) -> tuple[list[torch.Tensor], str]:
    tokenizer = load_tokenizer(model_dir)
    if tokenizer.ok:
        rows = []
        for text in texts:
            ids = tokenizer.tokenizer(text, truncation=True, max_length=CALIBRATION_LENGTH)["input_ids"]
            if len(ids) >= 2:
                rows.append(torch.tensor([ids]))
            if len(rows) >= params.calib_size:
                break
        if not rows:
            raise InputError("The calibration data produced no non-empty samples after tokenization")
        return rows, "text"
    if params.quantize != "fp8":
        raise InputError(
            f"OPTION_QUANTIZE={params.quantize} fits the weights to calibration text, and {tokenizer.warning}, so "
            "the text cannot be tokenized. Add the model's tokenizer files (tokenizer.json and tokenizer_config.json) "
            "beside config.json, or use OPTION_QUANTIZE=fp8, which calibrates on token ids without one"
        )
    if params.calib_dataset not in (None, "", "builtin"):
        raise InputError(
            f"OPTION_CALIB_DATASET={params.calib_dataset} is text, and {tokenizer.warning}, so it cannot be "
            "tokenized. Add the model's tokenizer files beside config.json, or leave OPTION_CALIB_DATASET unset "
            "to calibrate on token ids"
        )
    seqs = token_id_sequences(_config(model_dir), count=min(params.calib_size, 64), length=64, seed=0)
    return [torch.tensor([ids]) for ids in seqs], "token_ids"


def _modelopt_config(params: CudaCompileParams) -> dict[str, Any]:
    import modelopt.torch.quantization as mtq

    rules = cuda_rules()
    config = copy.deepcopy(getattr(mtq, str(rules.schemes[params.quantize].modelopt_config)))
    if params.kv_cache_quant:
        kv = getattr(mtq, rules.kv_cache[params.kv_cache_quant]["modelopt_config"])
        config["quant_cfg"] = list(config["quant_cfg"]) + list(copy.deepcopy(kv["quant_cfg"]))
    return config


def quantize_and_export(
    model_dir: Path,
    output_dir: Path,
    params: CudaCompileParams,
    *,
    texts: list[str],
    events: EventSink,
    cancel: CancelToken,
) -> dict[str, Any]:
    """Write Model Optimizer's unified checkpoint of ``model_dir`` to ``output_dir``; returns figures."""
    started = time.monotonic()
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM

    dtype = params.dtype or source_dtype(_config(model_dir))
    events(STAGE, "load", None, f"loading the model in {dtype} with transformers")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model.eval()
    figures: dict[str, Any] = {"engine": "modelopt", "quantize": params.quantize, "dtype": dtype}
    if params.quantize != "none":
        samples, kind = _samples(model_dir, texts, params)

        def forward_loop(module: torch.nn.Module) -> None:
            with torch.no_grad():
                for index, ids in enumerate(samples):
                    cancel.raise_if_cancelled()
                    module(ids)
                    events(STAGE, "calibrate", (index + 1) / len(samples), f"calibration sample {index + 1}")

        calibrate_started = time.monotonic()
        mtq.quantize(model, _modelopt_config(params), forward_loop)
        figures.update(
            calibration_samples=len(samples),
            calibration_inputs=kind,
            calibrate_seconds=round(time.monotonic() - calibrate_started, 3),
        )
    cancel.raise_if_cancelled()
    events(STAGE, "export", None, "export_hf_checkpoint")
    if params.quantize == "none":
        model.save_pretrained(output_dir)
    else:
        export_hf_checkpoint(model, export_dir=output_dir)
    for path in output_dir.glob("*.safetensors"):
        path.chmod(0o644)  # Model Optimizer writes 0600; the published files are read by the serving host
    figures["seconds"] = round(time.monotonic() - started, 3)
    return figures
