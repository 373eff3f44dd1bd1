"""The verification gate's figures for correct and corrupted outputs, to set configs/verify.yaml.

Why: a threshold is only right if every correct output passes it with room to spare and every
corrupted one fails it, on a trained model (peaked next-token distributions) *and* an untrained one
(nearly flat distributions, where top-1 flips on noise). This script quantizes the locally built
tiny model, trained and untrained (and the reference model with ``--models ...,reference``), with each scheme
through optjob's own engines, corrupts copies of some outputs the ways real bugs do (a scale off by
2x, a zeroed weight, two weights swapped, NF4 saved after a forward), and prints the per-tensor and
end-to-end figures, top-1 agreement at several confidence margins included.

    .venv/bin/python scripts/gate_figures.py [--schemes fp8_dynamic,gptq] [--models tiny,untrained,reference]

Takes a few minutes on two cores; nothing here is a test (the tests assert the verdicts).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common  # noqa: E402

MARGINS = (0.0, 0.1, 0.25, 0.5, 1.0)
SCHEMES = ("fp8_dynamic", "fp8", "gptq", "awq", "nf4", "int8")


def quantize(scheme: str, src: Path, out: Path) -> None:
    """The scheme through optjob's engines with the job's defaults (a small calibration set)."""
    from optjob.techniques.quantize import engines, streaming
    from optjob.techniques.quantize.calibration import load_texts
    from optjob.techniques.quantize.params import parse_params
    from optjob.techniques.quantize.technique import resolve_engine

    env = {"OPTION_QUANTIZE": "fp8", "OPTION_FP8_SCHEME": "FP8_DYNAMIC"} if scheme == "fp8_dynamic" else {
        "OPTION_QUANTIZE": scheme, "OPTION_CALIB_SIZE": "64"}  # fmt: skip
    if scheme == "fp8":
        env["OPTION_FP8_SCHEME"] = "FP8"
    params = parse_params(env)
    cfg = resolve_engine(params)
    if cfg["engine"] == "streaming":
        streaming.quantize_checkpoint(src, out, preset=cfg["preset"], ignore=params.ignore)
        engines.copy_aux_files(src, out)
    elif cfg["engine"] == "bitsandbytes":
        engines.bnb_quantize(src, out, params, dtype="fp32")
    else:
        texts = load_texts(None) if cfg["calibration"] else None
        engines.llmcompressor_quantize(src, out, params, cfg, texts=texts, dtype="auto", max_seq_len=256)


def _edit(model_dir: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
    for file in model_dir.glob("*.safetensors"):
        tensors = load_file(file)
        fn(tensors)
        save_file(tensors, file, metadata={"format": "pt"})


def _weight_key(tensors: dict[str, torch.Tensor], module: str) -> str:
    for suffix in ("weight_packed", "weight"):
        if f"{module}.{suffix}" in tensors:
            return f"{module}.{suffix}"
    raise KeyError(module)


def corruptions(scheme: str) -> dict[str, Callable[[dict[str, torch.Tensor]], None]]:
    target, other = "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.o_proj"

    def scale_x2(t: dict[str, torch.Tensor]) -> None:
        t[f"{target}.weight_scale"] = t[f"{target}.weight_scale"] * 2

    def zeroed(t: dict[str, torch.Tensor]) -> None:
        key = _weight_key(t, target)
        t[key] = torch.zeros_like(t[key])

    def swapped(t: dict[str, torch.Tensor]) -> None:
        a, b = "model.layers.1.self_attn.q_proj", other
        for suffix in ("weight_packed", "weight", "weight_scale", "weight_zero_point"):
            if f"{a}.{suffix}" in t:
                t[f"{a}.{suffix}"], t[f"{b}.{suffix}"] = t[f"{b}.{suffix}"], t[f"{a}.{suffix}"]

    if scheme in ("nf4", "int8"):
        return {}
    return {"scale x2": scale_x2, "zeroed": zeroed, "swapped": swapped}


def figures(src: Path, out: Path, scheme: str) -> dict[str, Any]:
    from optjob.verify.e2e import FigureSums, replay, verification_inputs
    from optjob.verify.gate import per_tensor_mode, thresholds_config
    from optjob.verify.tensors import compare_checkpoints

    cfg = thresholds_config()
    row: dict[str, Any] = compare_checkpoints(src, out, mode=per_tensor_mode(scheme)).as_dict()
    inputs = verification_inputs(src, list(cfg["prompts"]), max_tokens=128, token_ids=cfg["token_ids"])
    sums = FigureSums(MARGINS)
    stats, errors = replay(src, out, inputs, supported=list(cfg["e2e"]["architectures"]))
    sums.add(stats)
    row["max_layer_rel_error"] = max(errors)
    for margin in MARGINS:
        f = sums.result(margin)
        row[f"top1@{margin}"] = f["confident_top1_agreement"]
        row[f"n@{margin}"] = f["confident_positions"]
        row["mean_kl"] = f["mean_kl"]
    row["inputs"] = inputs.kind
    return row


def main(argv: list[str] | None = None) -> None:
    from optjob.testing import build_tiny_llama

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument(
        "--models",
        default="tiny,untrained",
        help="of tiny, untrained, reference (the trained reference model: ~13 min to build the first time)",
    )
    opts = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="gate-figures-"))
    builders = {
        "tiny": lambda: build_tiny_llama(tmp / "tiny"),
        "untrained": lambda: build_tiny_llama(tmp / "untrained", train_steps=0, seed=1),
        "reference": lambda: __import__("make_reference_model").build_reference_model().model_dir,
    }
    models = {name: builders[name]() for name in opts.models.split(",")}
    rows = []
    try:
        for model_name, src in models.items():
            for scheme in opts.schemes.split(","):
                out = tmp / f"{model_name}-{scheme}"
                quantize(scheme, src, out)
                cases = {"correct": None, **corruptions(scheme)}
                if scheme == "nf4":
                    from optjob.techniques.quantize import engines
                    from optjob.techniques.quantize.params import parse_params

                    bad = tmp / f"{model_name}-nf4-after-forward"
                    params = parse_params({"OPTION_QUANTIZE": "nf4", "OPTION_BNB_DOUBLE_QUANT": "false"})
                    engines.bnb_quantize(src, bad, params, dtype="fp32", save_after_forward=True)
                    cases["saved after forward"] = bad
                for case, corrupt in cases.items():
                    target = out
                    if isinstance(corrupt, Path):
                        target = corrupt
                    elif corrupt is not None:
                        target = tmp / f"{model_name}-{scheme}-{case.replace(' ', '_')}"
                        shutil.copytree(out, target)
                        _edit(target, corrupt)
                    f = figures(src, target, scheme)
                    rows.append(
                        [
                            model_name,
                            scheme,
                            case,
                            f["max_rel_error"],
                            f["min_cosine"],
                            f["max_layer_rel_error"],
                            f["mean_kl"],
                            *[f"{bench_common.fmt(f[f'top1@{m}'], 3)} ({f[f'n@{m}']})" for m in MARGINS],
                        ]
                    )
                    print(rows[-1], flush=True)
        headers = [
            "model",
            "scheme",
            "case",
            "max_rel",
            "min_cos",
            "layer_rel",
            "mean_kl",
            *[f"top1@{m} (n)" for m in MARGINS],
        ]
        bench_common.print_table(headers, rows, title="verification figures (top-1 at confidence margins, nats)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
