"""Time and memory of a CUDA compile job (Model Optimizer FP8) against the script a user would write.

Why: a compile job is Model Optimizer's ``quantize`` + ``export_hf_checkpoint`` wrapped in download,
verification and publishing. The yardstick is that same work run by hand on the same host in the
same run, and the cost of merely moving the bytes. For each model (uploaded to a real local S3
server, SeaweedFS ``weed mini`` on loopback), one after the other, each its own measured process
tree (wall time; peak RSS summed over the tree):

(a') floor: ``aws s3 cp --recursive`` down to disk, then the same bytes up;
(b)  by hand: ``aws s3 cp`` down, ``mtq.quantize(FP8_DEFAULT_CFG + FP8_KV_CFG)`` calibrated on the same
     number of samples, ``export_hf_checkpoint``, tokenizer copied, ``aws s3 cp`` up;
(c)  optjob: ``optjob run SPEC.json`` with ModelCompilationConfig OPTION_QUANTIZE=fp8,
     OPTION_KV_CACHE_QUANT=fp8 on ml.g6.12xlarge: fetch, quantize, export, runtime files, gate, publish.

Printed: wall and peak RSS of each, c/b (goal <= 1.1), c/a', and peak RSS / the model's bf16 size
(goal <= 1.3), plus the stage's own figures from the manifest. Models: the trained reference model
(scripts/make_reference_model.py) and the synthetic Llama-3.2-1B-shaped checkpoint of
scripts/bench_pipeline.py (2.47 GB, random weights).

    .venv/bin/python scripts/bench_compile.py                    # both models
    .venv/bin/python scripts/bench_compile.py --model reference  # the small one only
    .venv/bin/python scripts/bench_compile.py --quick             # a ~30 M-parameter checkpoint

AWQ, SmoothQuant and NVFP4 compile jobs are planned but not run by this build, so they are not measured.
Results also go to ``$OPTJOB_CACHE_DIR/bench/results/`` as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common  # noqa: E402
import bench_pipeline as synth  # noqa: E402

MiB = 2**20
ENV = {"OPTION_QUANTIZE": "fp8", "OPTION_KV_CACHE_QUANT": "fp8", "OPTION_TENSOR_PARALLEL_DEGREE": "4"}


def baseline_worker(src_uri: str, dst_uri: str, tmp: Path, samples: int) -> dict[str, Any]:
    """What a user scripts: download, Model Optimizer quantize + export, upload (phases timed)."""
    import copy

    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optjob.model_tokenizer import token_id_sequences
    from optjob.techniques.quantize.calibration import load_texts

    phases: dict[str, float] = {}
    local, out = tmp / "model", tmp / "out"
    t0 = time.perf_counter()
    subprocess.run([*synth.aws_cli(), "s3", "cp", "--recursive", "--only-show-errors", src_uri, str(local)], check=True)
    phases["download_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    config = json.loads((local / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(local, dtype=getattr(torch, config.get("dtype") or "bfloat16"))
    has_tokenizer = (local / "tokenizer.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(local) if has_tokenizer else None
    if tokenizer is not None:
        texts = load_texts(None)
        batches = [torch.tensor([tokenizer(t, truncation=True, max_length=256)["input_ids"]]) for t in texts[:samples]]
    else:
        batches = [torch.tensor([ids]) for ids in token_id_sequences(config, count=samples, length=64, seed=0)]
    phases["load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    recipe = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    recipe["quant_cfg"] = list(recipe["quant_cfg"]) + list(copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"]))

    def forward_loop(m: Any) -> None:
        with torch.no_grad():
            for ids in batches:
                m(ids)

    mtq.quantize(model, recipe, forward_loop)
    phases["quantize_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    export_hf_checkpoint(model, export_dir=out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    phases["export_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run([*synth.aws_cli(), "s3", "cp", "--recursive", "--only-show-errors", str(out), dst_uri], check=True)
    phases["upload_s"] = time.perf_counter() - t0
    return {k: round(v, 2) for k, v in phases.items()}


def model_dirs(names: list[str], quick: bool) -> list[tuple[str, Path]]:
    found = []
    if quick:
        path, _ = synth.synthetic_checkpoint(synth.QUICK_ARCH)
        return [("quick", path)]
    for name in names:
        if name == "reference":
            from make_reference_model import build_reference_model

            found.append(("reference", build_reference_model().model_dir))
        else:
            path, _ = synth.synthetic_checkpoint(synth.ARCHES[name])
            found.append((name, path))
    return found


def measure(server: Any, name: str, model_dir: Path, opts: argparse.Namespace, work: Path) -> dict[str, Any]:
    size = synth.dir_bytes(model_dir)
    env, client, src_uri, out_bucket = synth.stage_source(server, name, model_dir)
    env["PYTHONPATH"] = str(bench_common.REPO_ROOT)
    src_bucket = src_uri.split("/")[2]

    def measured(step: str, cmd: list[str], extra: dict[str, str] | None = None) -> bench_common.Measured:
        return bench_common.measured_step(name, step, cmd, env={**env, **(extra or {})}, work=work)

    floor = synth.floor_copy(name, src_uri, f"s3://{out_bucket}/copy/", env=env, work=work)
    hand_tmp = work / f"{name}-hand"
    hand_tmp.mkdir()
    hand = measured("b_by_hand", [sys.executable, __file__, "--baseline-worker", src_uri, f"s3://{out_bucket}/hand/",
                                  str(hand_tmp), str(opts.calib_size)])  # fmt: skip
    shutil.rmtree(hand_tmp, ignore_errors=True)
    spec = work / f"{name}-spec.json"
    compile_config = {
        "ModelCompilationConfig": {"OverrideEnvironment": {**ENV, "OPTION_CALIB_SIZE": str(opts.calib_size)}}
    }
    spec.write_text(json.dumps(synth.job_spec("bench-compile", src_uri, f"s3://{out_bucket}/optjob/", opts.target,
                                              compile_config)))  # fmt: skip
    job = measured("c_optjob_run", [sys.executable, "-m", "optjob", "run", str(spec)],
                   {"OPTJOB_HOME": str(work / f"{name}-home")})  # fmt: skip
    manifest = None
    with contextlib.suppress(Exception):
        manifest = json.loads(client.get_object(Bucket=out_bucket, Key="optjob/optjob-manifest.json")["Body"].read())
    for prefix in ("copy/", "hand/", "optjob/"):
        synth.delete_prefix(client, out_bucket, prefix)
    synth.delete_prefix(client, src_bucket, "model/")
    ok = job.rc == 0 and hand.rc == 0
    stage = (manifest or {}).get("metrics", {}).get("1:Compilation", {})
    return {
        "model": name,
        "model_bytes": size,
        "floor": floor.as_dict(),
        "by_hand": hand.as_dict(),
        "optjob": job.as_dict(),
        "ratios": {
            "c/b": job.wall_s / hand.wall_s if ok else None,
            "c/a'": job.wall_s / floor.wall_s if job.rc == 0 else None,
            "optjob peak RSS / model": job.peak_tree_bytes / size if job.rc == 0 else None,
            "by-hand peak RSS / model": hand.peak_tree_bytes / size if hand.rc == 0 else None,
        },
        "stage": {
            **{k: stage.get(k) for k in ("seconds", "calibrate_seconds", "calibration_samples")},
            "gate_passed": (stage.get("verification") or {}).get("passed"),
            "gate_e2e_seconds": ((stage.get("verification") or {}).get("e2e") or {}).get("seconds"),
            "gate_max_rel_error": ((stage.get("verification") or {}).get("per_tensor") or {}).get("max_rel_error"),
        },
        "timings": (manifest or {}).get("timings"),
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--baseline-worker":
        src, dst, tmp, samples = argv[1:5]
        print(json.dumps(baseline_worker(src, dst, Path(tmp), int(samples))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", choices=["reference", "llama-3.2-1b"],
                        help="model(s) to compile (default: both)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a ~30 M-parameter checkpoint only")
    parser.add_argument("--calib-size", type=int, default=16, help="calibration samples, both sides (default 16)")
    parser.add_argument("--target", default="ml.g6.12xlarge", help="DeploymentInstanceType (default %(default)s)")
    parser.add_argument("--json", type=Path, default=None, help="results file (default under the cache dir)")
    opts = parser.parse_args(argv)
    bench_common.exit_on_sigterm()
    models = model_dirs(opts.model or ["reference", "llama-3.2-1b"], opts.quick)
    record = bench_common.banner("bench_compile", {
        "models": [m for m, _ in models], "env": ENV, "calib_size": opts.calib_size, "target": opts.target,
        "s3": "SeaweedFS weed mini on loopback", "baseline": "aws s3 cp + mtq.quantize + export_hf_checkpoint",
    })  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="bench-compile-"))
    results = []
    try:
        with synth.s3_server() as server:
            for name, path in models:
                results.append(measure(server, name, path, opts, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = [
        [f"{r['model']} ({r['model_bytes'] / 1e9:.2f} GB)", r["floor"]["wall_s"], r["by_hand"]["wall_s"],
         r["optjob"]["wall_s"], r["ratios"]["c/b"], r["ratios"]["c/a'"], r["by_hand"]["peak_tree_mib"],
         r["optjob"]["peak_tree_mib"], r["ratios"]["optjob peak RSS / model"], r["optjob"]["rc"]]
        for r in results
    ]  # fmt: skip
    print()
    bench_common.print_table(
        ["model", "floor s", "by hand s", "optjob s", "c/b (<= 1.1)", "c/a'", "by hand MiB", "optjob MiB",
         "optjob peak / model (<= 1.3)", "rc"], rows,
        title=f"CUDA compile, Model Optimizer FP8 + FP8 KV cache ({bench_common.load_note()})",
    )  # fmt: skip
    for r in results:
        print(f"{r['model']}: stage {json.dumps(r['stage'])}; job timings {r['timings']}")
    record.update(results=results)
    bench_common.save_result("bench_compile", record, opts.json)


if __name__ == "__main__":
    main()
