#!/usr/bin/env bash
# Build (or reuse) the side environment in which tests/test_shard_vllm.py runs vLLM itself on CPU
# to cross-check optjob's sharded_state files. vLLM pins a CUDA torch, so it cannot share the
# project's environment: this one holds the CPU torch, the packages pinned in envs/vllm-cpu.lock,
# and vLLM installed with --no-deps. Prints the environment's python on its last line.
#
#   scripts/vllm_env.sh            # build if absent or stale (about 2 minutes, ~3.5 GB)
#   OPTJOB_VLLM_ENV=/path scripts/vllm_env.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/_side_env.sh"
VLLM_VERSION="$(awk '/^vllm:/{f=1} f && /version:/{gsub(/"/,"",$2); print $2; exit}' "$ROOT/configs/sharding.yaml")"
side_env_begin vLLM "${OPTJOB_VLLM_ENV:-${XDG_CACHE_HOME:-$HOME/.cache}/optjob/envs/vllm-$VLLM_VERSION}" \
  "$ROOT/envs/vllm-cpu.lock" "$VLLM_VERSION"
"$SIDE_ENV/bin/python" -m pip install --quiet --upgrade pip >&2
# torch==2.13.0 in the lock resolves to the local CPU build; nothing else may pull another torch.
"$SIDE_ENV/bin/python" -m pip install --quiet -r "$ROOT/envs/vllm-cpu.lock" >&2
"$SIDE_ENV/bin/python" -m pip install --quiet --no-deps "vllm==$VLLM_VERSION" >&2
"$SIDE_ENV/bin/python" -c "import torch, vllm; assert not torch.version.cuda, 'a CUDA torch was pulled in'; print('vllm', vllm.__version__, 'torch', torch.__version__)" >&2
side_env_done
