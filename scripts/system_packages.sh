#!/usr/bin/env bash
# Debian packages the test suite needs beyond Python: Chromium, which the console tests drive through
# Playwright (Playwright's own browser download cannot run on these machines). Installs only what is
# missing; safe to run again. Sourced by scripts/test.sh, or run on its own.
set -euo pipefail

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -eq 0 ]; then
  return 0 2>/dev/null || exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "scripts/system_packages.sh: the tests need Debian packages: ${missing[*]}" >&2
  echo "  install them with: sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
  return 1 2>/dev/null || exit 1
fi
echo "==> installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${missing[@]}" >/dev/null
