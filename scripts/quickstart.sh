#!/usr/bin/env bash
# First run on a fresh machine: creates .venv, installs optjob, and runs the main flow on the
# embedded defaults. Safe to run again.
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
ensure_venv ""
cd "$OPTJOB_ROOT"
exec "$VENV/bin/python" scripts/quickstart.py "$@"
