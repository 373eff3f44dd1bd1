# Shared by the scripts that build locked side environments (vllm_env.sh, neuron_env.sh): a library
# that cannot share optjob's environment gets its own venv under ~/.cache/optjob/envs, rebuilt only
# when its lock file or version changes. Source it, then:
#   side_env_begin NAME DIR LOCKFILE VERSION   # prints the python and exits if DIR is up to date,
#                                              # else creates an empty venv in DIR
#   ...install into "$SIDE_ENV/bin/python"...
#   side_env_done                              # stamps DIR and prints its python (last line)
side_env_begin() {
  local name="$1" dir="$2" lock="$3" version="$4"
  SIDE_ENV="$dir"
  SIDE_ENV_WANT="$(sha256sum < "$lock" | cut -d' ' -f1)-$version"
  SIDE_ENV_STAMP="$dir/.optjob-side-env"
  if [ -f "$SIDE_ENV_STAMP" ] && [ "$(cat "$SIDE_ENV_STAMP")" = "$SIDE_ENV_WANT" ]; then
    echo "$dir/bin/python"
    exit 0
  fi
  echo "==> building the $name $version side environment in $dir" >&2
  rm -rf "$dir"
  "${PYTHON:-python3}" -m venv "$dir"
}

side_env_done() {
  echo "$SIDE_ENV_WANT" > "$SIDE_ENV_STAMP"
  echo "$SIDE_ENV/bin/python"
}
