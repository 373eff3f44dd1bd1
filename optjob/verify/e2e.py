"""End-to-end check: reload the output with transformers in a fresh process and compare next-token
distributions with the source on fixed prompts.

A fresh process matters: it proves the directory on disk (not an object still in memory) loads
and predicts like the source, which is what catches save-time corruption such as bitsandbytes'
NF4 save-after-forward bug. Figures: top-1 next-token agreement and mean KL(source || output)
over every prompt position, computed in float32.

CLI (prints one JSON object): ``python -m optjob.verify.e2e SOURCE OUTPUT [--prompt TEXT ...]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from optjob.errors import InfrastructureError


def _logits(model_dir: Path, prompts: list[str], max_tokens: int) -> list[Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    quantized = "quantization_config" in cfg
    kwargs: dict[str, Any] = {"device_map": "cpu"} if quantized else {"dtype": torch.float32}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    model.eval()
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt", truncation=True, max_length=max_tokens)
            out.append(model(**ids).logits[0].float().log_softmax(-1))
    del model
    return out


def compare(source: Path, output: Path, prompts: list[str], *, max_tokens: int = 128) -> dict[str, Any]:
    """Top-1 agreement and KL figures of ``output`` against ``source`` (in this process)."""
    import torch

    src = _logits(source, prompts, max_tokens)
    out = _logits(output, prompts, max_tokens)
    agree = positions = 0
    kls: list[float] = []
    for s, o in zip(src, out, strict=True):
        agree += int((s.argmax(-1) == o.argmax(-1)).sum())
        positions += s.shape[0]
        kl = (s.exp() * (s - o)).sum(-1)
        kls.extend(kl.tolist())
    kl_t = torch.tensor(kls)
    return {
        "top1_agreement": agree / positions,
        "mean_kl": float(kl_t.mean()),
        "max_kl": float(kl_t.max()),
        "positions": positions,
        "prompts": len(prompts),
        "finite": bool(torch.isfinite(kl_t).all()),
    }


def run_in_subprocess(
    source: Path, output: Path, prompts: list[str], *, max_tokens: int = 128, timeout_s: float = 1800
) -> dict[str, Any]:
    """``compare`` in a fresh interpreter; its JSON is the last stdout line."""
    cmd = [sys.executable, "-m", "optjob.verify.e2e", str(source), str(output), "--max-tokens", str(max_tokens)]
    for prompt in prompts:
        cmd += ["--prompt", prompt]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-600:]
        raise InfrastructureError(f"end-to-end verification process failed (rc={proc.returncode}): {tail}")
    return dict(json.loads(lines[-1]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("source", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--prompt", action="append", default=[])
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    prompts = args.prompt
    if not prompts:
        from optjob.verify.gate import thresholds_config

        prompts = list(thresholds_config()["prompts"])
    result = compare(args.source, args.output, prompts, max_tokens=args.max_tokens)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
