# Shared by scripts/quickstart.sh and scripts/test.sh: create .venv if absent and install the
# project from its own files (pyproject.toml + requirements.lock) when they changed since the last
# install. Sourced, not run.

OPTJOB_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${OPTJOB_VENV:-$OPTJOB_ROOT/.venv}"
PYTHON_BIN="${PYTHON:-python3}"

ensure_venv() {
  local extras="$1"   # "" or "test"
  if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating virtual environment $VENV"
    "$PYTHON_BIN" -m venv "$VENV"
  fi
  local stamp="$VENV/.optjob-install-$( [ -n "$extras" ] && echo "$extras" || echo base )"
  local want
  want="$(cat "$OPTJOB_ROOT/pyproject.toml" "$OPTJOB_ROOT/requirements.lock" | sha256sum | cut -d' ' -f1)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  echo "==> installing optjob${extras:+[$extras]} (pinned by requirements.lock)"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  # torch==2.13.0 resolves to the local CPU build on these machines; the lock pins everything else.
  "$VENV/bin/python" -m pip install --quiet -c "$OPTJOB_ROOT/requirements.lock" \
    -e "$OPTJOB_ROOT${extras:+[$extras]}"
  "$VENV/bin/python" -m pip check
  echo "$want" > "$stamp"
}
