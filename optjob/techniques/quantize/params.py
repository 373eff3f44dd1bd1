"""OPTION_* environment -> typed ``QuantizationParams``, with SageMaker's defaults and allowed values.

The parameter table (types, defaults, allowed values) lives in ``configs/quantization.yaml`` so a
new value is a data change. Parsing errors are ``PlanError`` (ValidationException at Create) and
say which variable, which value, what is allowed, and where it was set (the request path).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from optjob.config_files import load_config
from optjob.package.serving import option_to_property
from optjob.pipeline.stage import PlanError

__all__ = ["QuantizationParams", "layer_env", "option_to_property", "parse_params"]

QuantizeName = Literal["awq", "fp8", "smoothquant", "gptq", "nf4", "int8", "nvfp4", "mxfp4"]


def layer_env(
    defaults: Mapping[str, str] | None,
    optimization_env: Mapping[str, str] | None,
    override_env: Mapping[str, str] | None,
) -> dict[str, str]:
    """Container defaults < OptimizationEnvironment < the config's OverrideEnvironment (reference 4.2)."""
    merged: dict[str, str] = {}
    for layer in (defaults, optimization_env, override_env):
        merged.update(layer or {})
    return merged


class QuantizationParams(BaseModel):
    """Resolved quantization parameters; ``source`` records which were set explicitly."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    quantize: QuantizeName
    awq_block_size: int = 128
    awq_weight_bit_width: int = 4
    awq_zero_point: bool = True
    awq_mm_version: str = "GEMM"
    awq_ignore_layers: tuple[str, ...] = ()
    gptq_group_size: int = 128
    fp8_scheme: Literal["FP8", "FP8_DYNAMIC", "FP8_BLOCK"] = "FP8"
    fp8_ignore: tuple[str, ...] = ("lm_head",)
    smoothquant_alpha: float = 0.8
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3"] = "auto"
    calib_size: int = 512
    calib_dataset: str = "builtin"
    max_model_len: int = 2048
    tensor_parallel_degree: int | None = None
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    bnb_double_quant: bool = True
    explicit: tuple[str, ...] = Field(default=(), description="OPTION_* keys the user set")

    @property
    def ignore(self) -> list[str]:
        """Modules left unquantized: always lm_head plus the scheme's user list (order kept, unique)."""
        always = list(load_config("quantization.yaml").get("always_ignore", []))
        extra = self.fp8_ignore if self.quantize == "fp8" else self.awq_ignore_layers
        out: list[str] = []
        for name in [*always, *extra]:
            if name and name not in out:
                out.append(name)
        return out


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _convert(key: str, raw: str, spec: Mapping[str, Any], where: str) -> Any:
    kind = spec.get("type", "str")
    text = raw.strip()
    try:
        if kind == "int":
            value: Any = int(text)
        elif kind == "float":
            value = float(text)
        elif kind == "bool":
            low = text.lower()
            if low not in _TRUE | _FALSE:
                raise ValueError
            value = low in _TRUE
        elif kind == "list":
            value = tuple(p.strip() for p in text.split(",") if p.strip())
        elif spec.get("case") == "upper":
            value = text.upper()
        elif spec.get("allowed") is not None:
            value = text.lower()
        else:
            value = text  # free text such as a dataset URI keeps its case
    except ValueError:
        raise PlanError(f"{key}={raw!r} at {where}: expected a {kind} value") from None
    allowed = spec.get("allowed")
    if allowed is not None:
        canon = [str(a).upper() if spec.get("case") == "upper" else a for a in allowed]
        if isinstance(value, str):
            canon = [c.lower() if spec.get("case") != "upper" else c for c in canon]
        if value not in canon:
            listed = ", ".join(str(a) for a in allowed)
            raise PlanError(f"{key}={raw!r} at {where} is not supported; allowed values: {listed}")
    if kind in ("int", "float"):
        low, high = spec.get("min"), spec.get("max")
        if (low is not None and value < low) or (high is not None and value > high):
            raise PlanError(f"{key}={raw!r} at {where} is out of range [{low}, {high}]")
    return value


def parse_params(env: Mapping[str, str], *, path: str = "OptimizationConfigs") -> QuantizationParams:
    """Typed parameters from the layered environment; unknown values raise ``PlanError``.

    ``path`` is the request path of the config element (e.g. ``optimizationConfigs.0
    .modelQuantizationConfig``); messages point at its ``overrideEnvironment`` or at the job's
    ``optimizationEnvironment`` (the layered env does not say which, so both are named).
    """
    table = load_config("quantization.yaml")["parameters"]
    where = f"{path}.overrideEnvironment or optimizationEnvironment"
    values: dict[str, Any] = {}
    explicit = []
    for key, spec in table.items():
        field = key[len("OPTION_") :].lower()
        raw = env.get(key)
        if raw is None or raw.strip() == "":
            default = spec.get("default")
            if default is None:
                continue
            values[field] = tuple(default) if isinstance(default, list) else default
            continue
        explicit.append(key)
        values[field] = _convert(key, raw, spec, where)
    if values.get("quantize") is None:
        values["quantize"] = load_config("quantization.yaml")["default_quantize"]
    values["explicit"] = tuple(explicit)
    return QuantizationParams(**values)
