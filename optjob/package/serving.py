"""serving.properties for DJL LMI, written next to the optimized weights.

LMI maps ``option.<x>`` to env ``OPTION_<X>``; the quantization container regenerates the file
after quantizing: the user's OPTION_* settings carried over, ``option.quantize`` rewritten to
``compressed-tensors`` for llm-compressor output, and never ``option.model_id`` (the deployed
container serves the directory it is in; reference 4.3 and 6.3).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def option_to_property(key: str) -> str:
    """``OPTION_MAX_MODEL_LEN`` -> ``option.max_model_len`` (``OPTION_ENTRYPOINT`` -> ``option.entryPoint``)."""
    if not key.startswith("OPTION_"):
        raise ValueError(f"{key} is not an OPTION_* variable")
    rest = key[len("OPTION_") :].lower()
    return "option.entryPoint" if rest == "entrypoint" else f"option.{rest}"


EXCLUDED = frozenset({"option.model_id", "option.calib_dataset", "option.calib_size"})
# Job-time knobs that mean nothing to the serving container.
JOB_ONLY_PREFIXES = ("option.awq_", "option.fp8_", "option.smoothquant_", "option.gptq_", "option.bnb_")


def properties_from_env(env: Mapping[str, str]) -> dict[str, str]:
    """``option.*`` entries for every serving-relevant OPTION_* in the layered environment."""
    props: dict[str, str] = {}
    for key, value in env.items():
        if not key.startswith("OPTION_"):
            continue
        prop = option_to_property(key)
        if prop in EXCLUDED or prop.startswith(JOB_ONLY_PREFIXES):
            continue
        props[prop] = value
    return props


def render(properties: Mapping[str, str], comments: Sequence[str] = ()) -> str:
    lines = [f"# {line}" for line in comments]
    lines += [f"{k}={v}" for k, v in sorted(properties.items()) if k not in EXCLUDED]
    return "\n".join(lines) + "\n"


def write_serving_properties(out_dir: Path, properties: Mapping[str, str], comments: Sequence[str] = ()) -> Path:
    """Write ``out_dir/serving.properties`` (sorted, ``option.model_id`` dropped), ``comments`` on top."""
    path = out_dir / "serving.properties"
    path.write_text(render(properties, comments), encoding="utf-8")
    return path


def read_serving_properties(path: Path) -> dict[str, str]:
    props: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            props[key.strip()] = value.strip()
    return props
