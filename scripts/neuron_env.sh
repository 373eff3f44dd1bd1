#!/usr/bin/env bash
# Build (or reuse) optimum-neuron's environment without the Neuron SDK: jobs use it to key and serve
# Neuron compile-cache hits (and to report why a miss cannot compile here), and tests/test_neuron_plan.py
# runs optimum-neuron's own export planning in it to cross-check optjob's Neuron plans. optimum-neuron
# 0.4.5 needs transformers 4.57, so it cannot share the project's environment; the Neuron SDK
# (neuronx-cc, torch-neuronx) is not on PyPI and is not installed: the cross-check stops where
# compilation would start. Prints the environment's python on its last line.
#
#   scripts/neuron_env.sh            # build if absent or stale (about 1.5 minutes, ~1.2 GB)
#   OPTJOB_NEURON_ENV=/path scripts/neuron_env.sh   # where jobs look for it too (optjob.techniques.compile.neuron_env)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/_side_env.sh"
VERSION="$(awk '/^optimum_neuron:/{gsub(/"/,"",$2); print $2; exit}' "$ROOT/configs/neuron.yaml")"
side_env_begin optimum-neuron \
  "${OPTJOB_NEURON_ENV:-${OPTJOB_NEURON_PLAN_ENV:-${XDG_CACHE_HOME:-$HOME/.cache}/optjob/envs/optimum-neuron-$VERSION}}" \
  "$ROOT/envs/neuron-plan.lock" "$VERSION"
# torch first, pinned to the local CPU build, so nothing can pull a CUDA torch.
"$SIDE_ENV/bin/python" -m pip install --quiet "torch==2.13.0" >&2
"$SIDE_ENV/bin/python" -m pip install --quiet -r "$ROOT/envs/neuron-plan.lock" >&2
"$SIDE_ENV/bin/python" -m pip check >&2
"$SIDE_ENV/bin/python" -c "import torch, transformers, optimum.neuron; from optimum.neuron.version import __version__ as v; assert v == '$VERSION', v; assert not torch.version.cuda; print('optimum-neuron', v, 'transformers', transformers.__version__)" >&2
side_env_done
