"""The engines that produce quantized checkpoints: llm-compressor ``oneshot`` and bitsandbytes.

(The data-free streaming engine is ``streaming.py``.) Each engine reads a local HF directory and
writes a complete HF directory: weights, ``config.json`` with ``quantization_config``, tokenizer
and generation config. Serving properties and verification are the caller's job.

CPU gotchas from docs/cpu-feasibility handled here, in code, not in the environment:
* llm-compressor's AWQ pins intermediates with ``Tensor.pin_memory()``, which raises on a host
  without an accelerator. ``_no_pin_memory_on_cpu`` turns ``IntermediatesCache.pin_memory`` into
  a no-op for the duration of one ``oneshot`` call, and only when CUDA is unavailable.
* bitsandbytes NF4 repacks 4-bit weights into a CPU layout on the first forward; saving after
  that writes weights that dequantize wrongly. ``bnb_quantize`` saves straight after loading,
  before any forward, and keeps double quantization on by default; the verify gate then checks
  the reloaded output.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from optjob.errors import InputError
from optjob.model_tokenizer import TokenizerLoad, load_tokenizer, token_id_sequences
from optjob.runtime.cancel import CancelToken
from optjob.runtime.events import NULL_SINK, EventSink
from optjob.techniques.quantize import fp8_cpu
from optjob.techniques.quantize.params import QuantizationParams
from optjob.techniques.quantize.streaming import torch_dtype

AUX_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def copy_aux_files(src: Path, dst: Path) -> None:
    """Tokenizer and generation config travel unchanged (the engines may not write all of them)."""
    for name in AUX_FILES:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)


@contextlib.contextmanager
def _no_pin_memory_on_cpu() -> Iterator[None]:
    """Scope llm-compressor's CPU workaround to one call; restore the original method after."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.cuda.is_available():
        yield
        return
    original = IntermediatesCache.__dict__.get("pin_memory")
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        if original is not None:
            IntermediatesCache.pin_memory = original  # type: ignore[method-assign]


def _weight_args(num_bits: int, group_size: int, symmetric: bool) -> Any:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy, QuantizationType

    return QuantizationArgs(
        num_bits=num_bits,
        type=QuantizationType.INT,
        strategy=QuantizationStrategy.GROUP,
        group_size=group_size,
        symmetric=symmetric,
        dynamic=False,
    )


def _kv_cache_args(params: QuantizationParams) -> Any:
    if params.kv_cache_dtype == "auto":
        return None
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=8, type="float", strategy="tensor", dynamic=False, symmetric=True)


def build_recipe(params: QuantizationParams, scheme_cfg: dict[str, Any]) -> list[Any]:
    """llm-compressor modifiers for one OPTION_QUANTIZE value (see configs/quantization.yaml)."""
    from compressed_tensors.quantization import QuantizationScheme
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    ignore = params.ignore
    kv = _kv_cache_args(params)
    recipe = scheme_cfg.get("recipe")
    if recipe == "awq":
        scheme = QuantizationScheme(
            targets=["Linear"],
            weights=_weight_args(params.awq_weight_bit_width, params.awq_block_size, not params.awq_zero_point),
        )
        return [
            AWQModifier(ignore=ignore, duo_scaling="both"),
            QuantizationModifier(config_groups={"group_0": scheme}, ignore=ignore, kv_cache_scheme=kv),
        ]
    if recipe == "gptq":
        scheme = QuantizationScheme(targets=["Linear"], weights=_weight_args(4, params.gptq_group_size, True))
        return [GPTQModifier(config_groups={"group_0": scheme}, ignore=ignore, kv_cache_scheme=kv)]
    if recipe == "smoothquant":
        return [
            SmoothQuantModifier(smoothing_strength=params.smoothquant_alpha),
            GPTQModifier(scheme="W8A8", targets=["Linear"], ignore=ignore, kv_cache_scheme=kv),
        ]
    if recipe == "fp8":
        return [QuantizationModifier(scheme=params.fp8_scheme, targets=["Linear"], ignore=ignore, kv_cache_scheme=kv)]
    if recipe == "preset":
        preset = scheme_cfg["preset"]
        return [QuantizationModifier(scheme=preset, targets=["Linear"], ignore=ignore, kv_cache_scheme=kv)]
    raise InputError(f"OPTION_QUANTIZE={params.quantize}: no llm-compressor recipe {recipe!r}")


def calibration_dataset(tokenizer: Any, texts: list[str], *, samples: int, max_len: int) -> Any:
    """Tokenized, truncated, non-empty samples as a ``datasets.Dataset`` of ``input_ids``."""
    from datasets import Dataset

    rows = []
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=max_len)["input_ids"]
        if len(ids) >= 2:  # empty samples crash llm-compressor (float input_ids)
            rows.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
        if len(rows) >= samples:
            break
    if not rows:
        raise InputError("calibration data produced no non-empty samples after tokenization")
    return Dataset.from_list(rows)


class _TokenIdsOnly:
    """The processor handed to ``oneshot`` when samples are token ids and the model has no tokenizer:
    llm-compressor only asks it which input names mark a dataset as already tokenized."""

    model_input_names = ["input_ids", "attention_mask"]


def _calibration_data(
    input_dir: Path,
    tokenizer: TokenizerLoad,
    texts: list[str],
    params: QuantizationParams,
    scheme_cfg: dict[str, Any],
    *,
    max_seq_len: int,
) -> Any:
    """Calibration samples: the texts tokenized, or, without a tokenizer, what the scheme allows.

    Schemes that only observe activation ranges (FP8 static, NVFP4) calibrate on seeded token ids
    from the vocabulary; schemes that fit weights to the data (GPTQ, AWQ, SmoothQuant) would be
    silently worse on random tokens, so they refuse with the reason and the fix.
    """
    if tokenizer.ok:
        return calibration_dataset(tokenizer.tokenizer, texts, samples=params.calib_size, max_len=max_seq_len)
    name = f"OPTION_QUANTIZE={params.quantize}"
    fix = (
        "Add the model's tokenizer files (tokenizer.json and tokenizer_config.json) beside config.json under "
        "ModelSource.S3.S3Uri, or choose a data-free scheme (OPTION_QUANTIZE=fp8 with OPTION_FP8_SCHEME=FP8_DYNAMIC)"
    )
    if scheme_cfg.get("without_tokenizer") != "token_ids":
        raise InputError(
            f"{name} fits the weights to calibration text, and {tokenizer.warning}, so the text cannot be "
            f"tokenized. {fix}."
        )
    if params.calib_dataset not in ("", "builtin"):
        raise InputError(
            f"OPTION_CALIB_DATASET={params.calib_dataset} is text, and {tokenizer.warning}, so it cannot be "
            f"tokenized. {fix}, or leave OPTION_CALIB_DATASET unset to calibrate on token ids."
        )
    from datasets import Dataset

    config = json.loads((input_dir / "config.json").read_text())
    length = min(max_seq_len, 512)
    seqs = token_id_sequences(config, count=min(params.calib_size, 256), length=length, seed=0)
    return Dataset.from_list([{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in seqs])


def llmcompressor_quantize(
    input_dir: Path,
    output_dir: Path,
    params: QuantizationParams,
    scheme_cfg: dict[str, Any],
    *,
    texts: list[str] | None,
    dtype: str,
    max_seq_len: int,
    events: EventSink = NULL_SINK,
    cancel: CancelToken | None = None,
) -> dict[str, Any]:
    """Run ``oneshot`` with the sequential pipeline (one decoder layer's activations at a time)."""
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    fp8_cpu.install()  # same bits as the library's FP8 compression, several times faster on CPU
    tdtype = torch_dtype(dtype) or "auto"
    tokenizer = load_tokenizer(input_dir)
    dataset = None
    if texts is not None:
        dataset = _calibration_data(input_dir, tokenizer, texts, params, scheme_cfg, max_seq_len=max_seq_len)
    model = AutoModelForCausalLM.from_pretrained(input_dir, dtype=tdtype)
    recipe = build_recipe(params, scheme_cfg)
    kwargs: dict[str, Any] = {}
    samples = 0
    if dataset is not None:
        samples = len(dataset)
        if not tokenizer.ok:
            kwargs["processor"] = _TokenIdsOnly()
        kwargs.update(
            dataset=dataset,
            num_calibration_samples=samples,
            max_seq_length=max_seq_len,
            shuffle_calibration_samples=False,
            pipeline="sequential",
        )
    if cancel is not None:
        cancel.raise_if_cancelled()
    events("quantize", "oneshot", 0.0, f"llm-compressor {params.quantize} on {samples} samples")
    started = time.monotonic()
    with _no_pin_memory_on_cpu():
        oneshot(model=model, recipe=recipe, **kwargs)
    elapsed = time.monotonic() - started
    if cancel is not None:
        cancel.raise_if_cancelled()
    model.save_pretrained(output_dir, save_compressed=True)
    if tokenizer.ok:
        tokenizer.tokenizer.save_pretrained(output_dir)
    copy_aux_files(input_dir, output_dir)
    details: dict[str, Any] = {"calibration_samples": samples, "oneshot_seconds": round(elapsed, 3)}
    if texts is not None:
        details["calibration_inputs"] = "text" if tokenizer.ok else "token_ids"
    return details


def bnb_quantize(
    input_dir: Path,
    output_dir: Path,
    params: QuantizationParams,
    *,
    dtype: str,
) -> dict[str, Any]:
    """bitsandbytes NF4 / LLM.int8 through transformers; saved before any forward pass."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute = torch_dtype(dtype) or torch.bfloat16
    if params.quantize == "nf4":
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=params.bnb_double_quant,
            bnb_4bit_compute_dtype=compute,
            llm_int8_skip_modules=params.ignore,
        )
    else:
        bnb = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=params.ignore)
    model = AutoModelForCausalLM.from_pretrained(input_dir, quantization_config=bnb, dtype=compute, device_map="cpu")
    model.save_pretrained(output_dir)  # before any forward: see module docstring
    tokenizer = load_tokenizer(input_dir)
    if tokenizer.ok:
        tokenizer.tokenizer.save_pretrained(output_dir)
    copy_aux_files(input_dir, output_dir)
    return {"double_quant": params.bnb_double_quant if params.quantize == "nf4" else None}
