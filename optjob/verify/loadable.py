"""Does transformers accept the output directory? Checked on the meta device, so it costs no memory.

The end-to-end replay reads the files with the decoders of the quantization libraries; this check
asks the consumer itself: ``from_pretrained`` with the output's own ``quantization_config`` builds
the quantized model's modules and matches every tensor of the files against them. A missing scale,
an unexpected or mis-shaped tensor, or a config transformers cannot parse is a failure naming the
tensors. bitsandbytes quant states cannot be materialized on the meta device, so those outputs are
left to the replay (which decodes them from the same files).
"""

from __future__ import annotations

import json
from pathlib import Path

from optjob.errors import first_line


def transformers_load_problems(output: Path) -> tuple[list[str], str | None]:
    """``(problems, skipped)``: what keeps transformers from loading ``output``, or why not checked."""
    config = json.loads((output / "config.json").read_text())
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method == "bitsandbytes":
        return [], "transformers load check skipped: bitsandbytes weights cannot be loaded on the meta device"
    if method == "modelopt":
        return [], "transformers load check skipped: transformers does not read Model Optimizer checkpoints (vLLM does)"
    from transformers import AutoModelForCausalLM

    try:
        _, info = AutoModelForCausalLM.from_pretrained(output, device_map="meta", output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        return [f"transformers cannot load the output ({type(exc).__name__}: {first_line(exc)})"], None
    problems = []
    for key, what in (
        ("missing_keys", "missing"),
        ("unexpected_keys", "unexpected"),
        ("mismatched_keys", "mis-shaped"),
    ):
        names = sorted(str(n) for n in info.get(key) or [])
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            problems.append(f"transformers finds {len(names)} {what} tensor(s) in the output: {shown}")
    return problems, None
