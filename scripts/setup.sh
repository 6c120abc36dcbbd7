#!/usr/bin/env bash
# Create .venv (if missing) and install compensa into it.
#   bash scripts/setup.sh          # the project
#   bash scripts/setup.sh --dev    # the project and its test dependencies
#   bash scripts/setup.sh --bench  # the project and the benchmarks' DBOS peer
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
[ "${1:-}" = "--bench" ] && extras="[bench]"

if [ -x .venv/bin/python ]; then
  echo "using existing .venv ($(.venv/bin/python --version))"
else
  if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "python3 >= 3.11 required, found $(python3 --version 2>&1)" >&2
    exit 1
  fi
  if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    echo "installing python3-venv"
    if [ "$(id -u)" -eq 0 ]; then apt-get install -y -q python3-venv; else sudo -n apt-get install -y -q python3-venv; fi
  fi
  python3 -m venv .venv
  echo "created .venv ($(.venv/bin/python --version))"
fi
# The build backend's chatter is shown only when the install fails.
if ! pip_log=$(.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras}" 2>&1); then
  echo "$pip_log" >&2
  exit 1
fi
echo "installed compensa${extras} into .venv"
