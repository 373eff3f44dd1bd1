#!/usr/bin/env bash
# One prepared run on a GPU host (the `device` machine: torch + transformers, no registry access):
# trains an EAGLE-3 head for the reference model on CUDA with the stage's defaults, measures it with the
# same evaluator, and prints each phase's time beside the last CPU run's (bench results in
# $OPTJOB_CACHE_DIR/bench/results, default ~/.cache/optjob). Serving with vLLM stays a manual check
# (vLLM's wheels cannot be carried there).
#
#   scripts/gpu_smoke.sh            # ~5 min on one H100/H200 once the reference model is cached
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device: run this on a GPU host"
print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__)
PY
# the reference model: cached if $OPTJOB_CACHE_DIR came along, otherwise built here (deterministic)
"$PY" scripts/make_reference_model.py
"$PY" scripts/bench_speculative.py
"$PY" - <<'PY'
import json, os
from pathlib import Path
base = Path(os.environ.get("OPTJOB_CACHE_DIR", Path.home() / ".cache" / "optjob")) / "bench" / "results"
runs = sorted(base.glob("speculative-2*.json"), key=lambda p: p.stat().st_mtime)
by_device = {}
for path in runs:
    record = json.loads(path.read_text())
    by_device[record.get("device", "cpu").split(":")[0]] = record
if {"cpu", "cuda"} <= by_device.keys():
    cpu, gpu = by_device["cpu"]["phases"], by_device["cuda"]["phases"]
    print(f"{'phase':<12} {'cpu s':>8} {'cuda s':>8} {'speed-up':>9}")
    for name in gpu:
        c, g = cpu.get(name, {}).get("seconds"), gpu[name]["seconds"]
        print(f"{name:<12} {c!s:>8} {g:>8} {(c / g if c and g else float('nan')):>9.1f}")
else:
    print("no CPU run recorded here to compare with; run scripts/bench_speculative.py on a CPU host too")
PY
