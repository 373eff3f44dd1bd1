"""Quality of every quantization scheme on the trained reference model, beside the field's baseline.

Why: "accuracy kept" is the first number a user picks a scheme by, and it only means something on a
model that has accuracy (see make_reference_model.py) and next to what the standard tool gives on
the same inputs. For each scheme this script produces two quantized models from the same bf16
reference checkpoint and the same calibration texts:

* ours: optjob's real technique (``QuantizationTechnique.plan`` + ``run``: pre-flight, engine,
  serving files, verification gate), exactly as a job runs it;
* baseline: llm-compressor's own ``oneshot`` with its documented recipe for the scheme (preset
  scheme names, the modifiers of llm-compressor's examples, written out here independently of
  optjob's engines.py) and the same parameter values as our defaults (group 128, lm_head kept,
  SmoothQuant alpha 0.8, AWQ duo scaling "both"), saved compressed and reloaded like ours; for the
  bitsandbytes schemes (nf4, int8) plain transformers ``BitsAndBytesConfig`` loading, in memory.

Both are then scored against the source on held-out windows of the reference corpus: perplexity
(and its change), top-1 next-token agreement and mean KL(source || quantized), in float32. Each
quantization runs in a fresh subprocess so its wall time and peak RSS (process tree, including the
gate's verification process for ours) are its own and no library state leaks between schemes.

Calibrated schemes use the built-in calibration corpus (``optjob/data/calibration``), the first
``--calib-size`` non-empty samples truncated to ``--max-seq`` tokens, for both sides (ours gets them
through OPTION_CALIB_SIZE / OPTION_MAX_MODEL_LEN). Defaults are the job's defaults (512, 2048).

Full run (the reference model is trained first if not cached, ~15 min; then ~20-30 min):

    .venv/bin/python scripts/bench_quality.py

``--schemes fp8,awq`` picks schemes; ``--quick`` runs at toy scale (the smoke test's settings).
Results also go to ``$OPTJOB_CACHE_DIR/bench/results/`` as JSON.

Targets (issue #7): FP8 mean KL <= 0.01 and top-1 >= 98 %; W4A16 (awq, gptq) perplexity within 5 %
of the source; every scheme no worse than its baseline (tolerances printed with the table).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common  # noqa: E402
import make_reference_model  # noqa: E402

# "No worse than the baseline": ours may trail by at most these (evaluation is deterministic, so
# the tolerances only absorb float-order differences between two correct implementations).
TOL_PPL_REL = 0.002
TOL_KL_REL = 0.05
TOL_KL_ABS = 1e-5
TOL_TOP1_ABS = 0.002
FP8_MAX_KL, FP8_MIN_TOP1, W4A16_MAX_PPL_CHANGE = 0.01, 0.98, 0.05


@dataclass(frozen=True)
class Scheme:
    env: dict[str, str]
    target: str
    calibrated: bool
    kind: str  # "llmcompressor" | "bitsandbytes" (which baseline applies)


_G6 = "ml.g6.12xlarge"
SCHEMES: dict[str, Scheme] = {
    "fp8": Scheme({"OPTION_QUANTIZE": "fp8"}, _G6, True, "llmcompressor"),
    "fp8_dynamic": Scheme({"OPTION_QUANTIZE": "fp8", "OPTION_FP8_SCHEME": "FP8_DYNAMIC"}, _G6, False, "llmcompressor"),
    "fp8_block": Scheme({"OPTION_QUANTIZE": "fp8", "OPTION_FP8_SCHEME": "FP8_BLOCK"}, _G6, False, "llmcompressor"),
    "awq": Scheme({"OPTION_QUANTIZE": "awq"}, _G6, True, "llmcompressor"),
    "gptq": Scheme({"OPTION_QUANTIZE": "gptq"}, _G6, True, "llmcompressor"),
    "smoothquant": Scheme({"OPTION_QUANTIZE": "smoothquant"}, _G6, True, "llmcompressor"),
    "nvfp4": Scheme({"OPTION_QUANTIZE": "nvfp4"}, "ml.p6-b200.48xlarge", True, "llmcompressor"),
    "mxfp4": Scheme({"OPTION_QUANTIZE": "mxfp4"}, "ml.g7e.2xlarge", False, "llmcompressor"),
    "nf4": Scheme({"OPTION_QUANTIZE": "nf4"}, _G6, False, "bitsandbytes"),
    "int8": Scheme({"OPTION_QUANTIZE": "int8"}, _G6, False, "bitsandbytes"),
}
IGNORE = ["lm_head"]


def baseline_recipe(name: str) -> list[Any]:
    """llm-compressor's documented recipe for the scheme (its examples/ and preset scheme names)."""
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    presets = {
        "fp8": "FP8",
        "fp8_dynamic": "FP8_DYNAMIC",
        "fp8_block": "FP8_BLOCK",
        "nvfp4": "NVFP4",
        "mxfp4": "MXFP4A16",
    }
    if name in presets:
        return [QuantizationModifier(targets="Linear", scheme=presets[name], ignore=IGNORE)]
    if name == "awq":
        return [
            AWQModifier(duo_scaling="both"),
            QuantizationModifier(targets=["Linear"], scheme="W4A16_ASYM", ignore=IGNORE),
        ]
    if name == "gptq":
        return [GPTQModifier(targets="Linear", scheme="W4A16", ignore=IGNORE)]
    if name == "smoothquant":
        return [
            SmoothQuantModifier(smoothing_strength=0.8),
            GPTQModifier(targets="Linear", scheme="W8A8", ignore=IGNORE),
        ]
    raise ValueError(f"no llm-compressor baseline for {name}")


def calibration_rows(tokenizer: Any, *, samples: int, max_seq: int) -> list[dict[str, list[int]]]:
    """The built-in corpus, first ``samples`` texts that tokenize to >= 2 tokens, truncated to ``max_seq``."""
    from optjob.techniques.quantize.calibration import load_texts

    rows = []
    for text in load_texts(None):
        ids = tokenizer(text, truncation=True, max_length=max_seq)["input_ids"]
        if len(ids) >= 2:
            rows.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
        if len(rows) >= samples:
            break
    return rows


# --- the two sides ---------------------------------------------------------------------------------


def run_ours(name: str, src: Path, out: Path, work: Path, *, calib_size: int, max_seq: int) -> dict[str, Any]:
    """optjob's technique, planned and run as a job stage; a gate failure is recorded, not raised."""
    from pydantic import BaseModel

    from optjob.errors import VerificationFailed
    from optjob.pipeline.stage import StageContext, technique_for
    from optjob.targets.catalog import instance

    class _Config(BaseModel):
        Image: str | None = None

    scheme = SCHEMES[name]
    env = {**scheme.env, "OPTION_CALIB_SIZE": str(calib_size), "OPTION_MAX_MODEL_LEN": str(max_seq)}
    tech = technique_for("ModelQuantizationConfig")
    target = instance(scheme.target)
    stage = tech.plan(_Config(), env, target, path="optimizationConfigs.0.modelQuantizationConfig")
    ctx = StageContext(job_name=f"bench-{name}", input_dir=src, output_dir=out, work_dir=work, target=target)
    try:
        result = tech.run(stage, ctx)
    except VerificationFailed as exc:
        rejected = work / "rejected-output"
        shutil.rmtree(out, ignore_errors=True)
        shutil.move(str(rejected), str(out))
        return {"engine": stage.engine, "gate_passed": False, "gate_message": str(exc)}
    m = result.metrics
    return {
        "engine": stage.engine,
        "gate_passed": bool(m["verification"]["passed"]),
        "gate_e2e": m["verification"].get("e2e"),
        "timings": m["timings"],
        "calibration_samples": m["engine_details"].get("calibration_samples"),
    }


def run_baseline_llmcompressor(name: str, src: Path, out: Path, *, calib_size: int, max_seq: int) -> dict[str, Any]:
    """llm-compressor's oneshot with its own recipe on the same calibration rows; saved compressed."""
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # llm-compressor's AWQ calls Tensor.pin_memory(), which raises without an accelerator; the
    # baseline needs the same one-line CPU workaround as our engine or it cannot run here at all.
    from optjob.techniques.quantize.engines import _no_pin_memory_on_cpu

    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(src)
    kwargs: dict[str, Any] = {}
    samples = 0
    if SCHEMES[name].calibrated:
        from datasets import Dataset

        rows = calibration_rows(tokenizer, samples=calib_size, max_seq=max_seq)
        samples = len(rows)
        kwargs = dict(
            dataset=Dataset.from_list(rows),
            num_calibration_samples=samples,
            max_seq_length=max_seq,
            shuffle_calibration_samples=False,
        )
    recipe = baseline_recipe(name)
    t0 = time.perf_counter()
    with _no_pin_memory_on_cpu():
        oneshot(model=model, recipe=recipe, **kwargs)
    oneshot_s = time.perf_counter() - t0
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    return {
        "engine": "llmcompressor oneshot",
        "calibration_samples": samples,
        "oneshot_s": round(oneshot_s, 3),
        "recipe": [type(m).__name__ for m in recipe],
    }


def bnb_config(name: str) -> Any:
    """Plain transformers BitsAndBytesConfig with our parameter values (double quant on, lm_head kept)."""
    import torch
    from transformers import BitsAndBytesConfig

    if name == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            llm_int8_skip_modules=IGNORE,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=IGNORE)


# --- one (scheme, side) in isolation ---------------------------------------------------------------


def quantize_and_score(
    side: str,
    name: str,
    src: Path,
    root: Path,
    reference: bench_common.SourceReference | Callable[[], bench_common.SourceReference],
    *,
    calib_size: int,
    max_seq: int,
) -> dict[str, Any]:
    """Quantize ``src`` with one side, measure time and peak RSS, then score against the reference.

    ``reference`` may be a loader, called only after quantizing, so the source's log-probabilities
    (hundreds of MB at full scale) are not in memory while the quantization's peak RSS is sampled.
    """
    out, work = root / f"{side}-{name}", root / f"{side}-{name}-work"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    in_memory = None
    if side == "ours":
        measured, info = bench_common.measure_call(
            "ours", lambda: run_ours(name, src, out, work, calib_size=calib_size, max_seq=max_seq)
        )
    elif SCHEMES[name].kind == "bitsandbytes":
        from transformers import AutoModelForCausalLM

        def load() -> Any:
            return AutoModelForCausalLM.from_pretrained(src, quantization_config=bnb_config(name), device_map="cpu")

        measured, in_memory = bench_common.measure_call("baseline", load)
        in_memory.eval()
        info = {"engine": "transformers BitsAndBytesConfig (in memory)"}
    else:
        measured, info = bench_common.measure_call(
            "baseline", lambda: run_baseline_llmcompressor(name, src, out, calib_size=calib_size, max_seq=max_seq)
        )
    model = in_memory if in_memory is not None else bench_common.load_causal_lm(out, float32=False)
    t0 = time.perf_counter()
    scores = bench_common.compare_to_source(reference() if callable(reference) else reference, model)
    return {
        "side": side,
        "scheme": name,
        **info,
        "quantize_wall_s": round(measured.wall_s, 3),
        "peak_rss_mib": round(measured.peak_tree_bytes / 2**20, 1),
        "peak_anon_mib": round(measured.peak_tree_anon_bytes / 2**20, 1),
        "eval_s": round(time.perf_counter() - t0, 3),
        **scores,
    }


def _worker(args: argparse.Namespace) -> None:
    """Subprocess entry: one (side, scheme); the source reference comes from a file the parent wrote."""
    import torch

    torch.set_num_threads(args.threads)

    def reference() -> bench_common.SourceReference:
        saved = torch.load(args.reference, weights_only=True)
        return bench_common.SourceReference(saved["windows"], list(saved["log_probs"]), float(saved["perplexity"]))

    row = quantize_and_score(
        args.side, args.scheme, args.src, args.root, reference, calib_size=args.calib_size, max_seq=args.max_seq
    )
    args.result.write_text(json.dumps(row, default=str))


def _run_isolated(
    side: str, name: str, src: Path, root: Path, ref_file: Path, opts: argparse.Namespace
) -> dict[str, Any]:
    result = root / f"{side}-{name}.json"
    log = root / f"{side}-{name}.log"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--side",
        side,
        "--scheme",
        name,
        "--src",
        str(src),
        "--root",
        str(root),
        "--reference",
        str(ref_file),
        "--result",
        str(result),
        "--calib-size",
        str(opts.calib_size),
        "--max-seq",
        str(opts.max_seq),
        "--threads",
        str(opts.threads),
    ]
    env = {**os.environ, "PYTHONPATH": str(bench_common.REPO_ROOT)}
    measured = bench_common.run_measured(f"{side}-{name}", cmd, env=env, log_path=log)
    if measured.rc != 0 or not result.is_file():
        print(f"  {side} {name} FAILED (rc={measured.rc}); log {log}:\n{measured.output_tail[-1500:]}", flush=True)
        return {"side": side, "scheme": name, "error": measured.output_tail[-800:], "process_wall_s": measured.wall_s}
    row = json.loads(result.read_text())
    row["process_wall_s"] = round(measured.wall_s, 3)
    row["process_peak_rss_mib"] = round(measured.peak_tree_bytes / 2**20, 1)
    return row


def verdict(name: str, ours: dict[str, Any], base: dict[str, Any]) -> tuple[str, str]:
    """(no worse than baseline?, issue target met?) as short strings."""
    if "error" in ours or "error" in base:
        return "n/a", "n/a"
    worse = []
    if ours["perplexity"] > base["perplexity"] * (1 + TOL_PPL_REL):
        worse.append("ppl")
    if ours["mean_kl"] > base["mean_kl"] * (1 + TOL_KL_REL) + TOL_KL_ABS:
        worse.append("KL")
    if ours["top1_agreement"] < base["top1_agreement"] - TOL_TOP1_ABS:
        worse.append("top1")
    no_worse = "yes" if not worse else "NO (" + ",".join(worse) + ")"
    if name.startswith("fp8"):
        ok = ours["mean_kl"] <= FP8_MAX_KL and ours["top1_agreement"] >= FP8_MIN_TOP1
        target = f"{'met' if ok else 'MISSED'} (KL<={FP8_MAX_KL}, top1>={FP8_MIN_TOP1:.0%})"
    elif name in ("awq", "gptq"):
        ok = ours["ppl_change"] <= W4A16_MAX_PPL_CHANGE
        target = f"{'met' if ok else 'MISSED'} (ppl +<={W4A16_MAX_PPL_CHANGE:.0%})"
    else:
        target = "-"
    return no_worse, target


def run(opts: argparse.Namespace) -> dict[str, Any]:
    import torch

    ref_args = make_reference_model.QUICK if opts.quick else make_reference_model.RefArgs()
    ref = make_reference_model.build_reference_model(ref_args)
    src = ref.model_dir
    windows = ref.eval_windows(opts.eval_windows)
    names = [s.strip() for s in opts.schemes.split(",") if s.strip()]
    unknown = [n for n in names if n not in SCHEMES]
    if unknown:
        raise SystemExit(f"unknown schemes {unknown}; choose from {', '.join(SCHEMES)}")
    record = bench_common.banner(
        "bench_quality",
        {
            "reference_model": str(src),
            "reference_parameters_M": round(ref.report["parameters"] / 1e6, 2),
            "reference_args": ref.report["args"],
            "reference_random_init_ppl": round(ref.report["random_init_perplexity"], 2),
            "eval": f"{windows.shape[0]} held-out windows x {windows.shape[1]} tokens "
            f"({ref.report['corpus']['heldout_files']} held-out stdlib files)",
            "schemes": names,
            "calibration": f"built-in corpus, first {opts.calib_size} samples, <= {opts.max_seq} tokens each",
            "threads": opts.threads,
            "isolated_subprocesses": not opts.in_process,
        },
    )
    torch.set_num_threads(opts.threads)
    source = bench_common.load_causal_lm(src, float32=True)
    reference = bench_common.SourceReference.build(source, windows)
    del source
    print(f"source held-out perplexity: {reference.perplexity:.4f}\n", flush=True)
    root = Path(tempfile.mkdtemp(prefix="bench-quality-", dir=opts.work_dir))
    ref_file = root / "source-reference.pt"
    if not opts.in_process:
        torch.save(
            {
                "windows": reference.windows,
                "log_probs": torch.stack(reference.log_probs),
                "perplexity": reference.perplexity,
            },
            ref_file,
        )
    rows: list[dict[str, Any]] = []
    try:
        for name in names:
            for side in ("ours", "baseline"):
                print(f"--- {name}: {side} ({bench_common.load_note()})", flush=True)
                if opts.in_process:
                    row = quantize_and_score(
                        side, name, src, root, reference, calib_size=opts.calib_size, max_seq=opts.max_seq
                    )
                else:
                    row = _run_isolated(side, name, src, root, ref_file, opts)
                rows.append(row)
                if "error" not in row:
                    print(
                        f"    ppl {row['perplexity']:.4f}  top1 {row['top1_agreement']:.4f}  KL {row['mean_kl']:.3g}  "
                        f"quantize {row['quantize_wall_s']:.1f} s  peak {row['peak_rss_mib']:.0f} MiB",
                        flush=True,
                    )
    finally:
        if not opts.keep:
            shutil.rmtree(root, ignore_errors=True)
    table = summarize(names, rows, reference.perplexity)
    record.update(
        source_perplexity=reference.perplexity,
        rows=rows,
        table=table,
        tolerances={"ppl_rel": TOL_PPL_REL, "kl_rel": TOL_KL_REL, "kl_abs": TOL_KL_ABS, "top1_abs": TOL_TOP1_ABS},
    )
    return record


def summarize(names: list[str], rows: list[dict[str, Any]], source_ppl: float) -> str:
    by = {(r["side"], r["scheme"]): r for r in rows}
    out = []
    for name in names:
        ours, base = by[("ours", name)], by[("baseline", name)]
        no_worse, target = verdict(name, ours, base)

        def q(r: dict[str, Any]) -> list[Any]:
            if "error" in r:
                return ["error", "-", "-", "-", "-", "-"]
            return [
                r["perplexity"],
                f"{100 * r['ppl_change']:+.2f}%",
                f"{100 * r['top1_agreement']:.2f}%",
                r["mean_kl"],
                r["quantize_wall_s"],
                round(r["peak_rss_mib"]),
            ]

        counts = (ours.get("calibration_samples"), base.get("calibration_samples"))
        if None not in counts and counts[0] != counts[1]:
            print(
                f"note: {name}: calibration samples differ: ours {ours.get('calibration_samples')}, "
                f"baseline {base.get('calibration_samples')}"
            )
        gate = "-" if "error" in ours else ("pass" if ours.get("gate_passed") else "FAIL")
        gate_s = (ours.get("timings") or {}).get("verify_s")
        out.append([name, *q(ours), gate, gate_s, *q(base), no_worse, target])
    headers = [
        "scheme",
        "ours ppl",
        "dppl",
        "top1",
        "mean KL",
        "s",
        "MiB",
        "gate",
        "gate s",
        "base ppl",
        "dppl",
        "top1",
        "mean KL",
        "s",
        "MiB",
        "no worse?",
        "issue target",
    ]
    print()
    text = bench_common.print_table(
        headers,
        out,
        title=f"quality vs source (held-out ppl {source_ppl:.4f}); ours = optjob job stage, "
        "base = llm-compressor oneshot / transformers bitsandbytes;\n"
        "s = quantize wall (ours: the whole stage incl. its verification gate, whose share is 'gate s'), "
        "MiB = peak RSS of the process tree (ours incl. the gate's fresh verification process)",
    )
    print(
        f"no-worse tolerances: ppl +{TOL_PPL_REL:.1%}, KL x{1 + TOL_KL_REL} + {TOL_KL_ABS}, "
        f"top1 -{TOL_TOP1_ABS:.1%} (abs)"
    )
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--quick", action="store_true", help="toy reference model, fp8_dynamic only, small calibration")
    parser.add_argument(
        "--calib-size", type=int, default=None, help="calibration samples (default: the job default, 512)"
    )
    parser.add_argument("--max-seq", type=int, default=None, help="tokens per calibration sample (default 2048)")
    parser.add_argument("--eval-windows", type=int, default=None, help="held-out windows (default: the reference's)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--in-process", action="store_true", help="no subprocess per run (faster start, shared RSS)")
    parser.add_argument("--keep", action="store_true", help="keep the quantized models")
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="results file (default under the cache dir)")
    # internal: one isolated (side, scheme) run
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for flag in ("--side", "--scheme"):
        parser.add_argument(flag, help=argparse.SUPPRESS)
    for flag in ("--src", "--root", "--reference", "--result"):
        parser.add_argument(flag, type=Path, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    bench_common.exit_on_sigterm()
    if opts.worker:
        _worker(opts)
        return
    if opts.quick and "--schemes" not in " ".join(argv if argv is not None else sys.argv):
        opts.schemes = "fp8_dynamic"
    opts.calib_size = opts.calib_size or (16 if opts.quick else 512)
    opts.max_seq = opts.max_seq or (64 if opts.quick else 2048)
    bench_common.save_result("bench_quality", run(opts), opts.json)


if __name__ == "__main__":
    main()
