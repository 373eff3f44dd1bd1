#!/usr/bin/env bash
# Run the test suite: installs the Debian packages the tests need (scripts/system_packages.sh),
# creates/reuses .venv, installs optjob with its test extras, runs pytest.
# Extra arguments go to pytest, e.g. scripts/test.sh -k conformance -x
set -euo pipefail
source "$(dirname "$0")/system_packages.sh"
source "$(dirname "$0")/_venv.sh"
ensure_venv test
cd "$OPTJOB_ROOT"
exec "$VENV/bin/python" -m pytest "$@"
