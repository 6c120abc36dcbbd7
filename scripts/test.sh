#!/usr/bin/env bash
# Set up a fresh Debian machine and run the whole test suite: the one test command.
#   bash scripts/test.sh [pytest args...]
# Installs missing server packages (the test harness starts its own servers from them) and
# Node.js/npm (the official AsyncAPI parser checks `compensa contracts export`),
# creates .venv if missing, installs the project with its dev extras, checks lint, format
# and types (ruff, mypy: any finding fails before a test runs), then runs pytest and exits
# with pytest's status (5, "no tests collected", counts as a failure).
set -euo pipefail
cd "$(dirname "$0")/.."

phase() { printf '\n==> %s\n' "$*"; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo -n "$@"
  else
    echo "need root (or sudo) to run: $*" >&2
    return 1
  fi
}

missing_packages() {
  local missing=()
  compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
  { [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] && command -v epmd >/dev/null 2>&1; } \
    || missing+=(rabbitmq-server)
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  # prometheus ships promtool too: the monitoring tests check the configuration with both.
  { command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; } || missing+=(prometheus)
  # The console's browser test drives Debian's chromium through its chromedriver (Selenium).
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
  # Node.js and npm run the official AsyncAPI parser (tests/harness/asyncapi.py installs the
  # parser itself with npm into .cache/). A Node.js that bundles npm needs no npm package.
  command -v node >/dev/null 2>&1 || missing+=(nodejs)
  command -v npm >/dev/null 2>&1 || missing+=(npm)
  if [ ! -x .venv/bin/python ] && ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    missing+=(python3-venv)
  fi
  echo "${missing[*]:-}"
}

# Package scripts must not try to start services: there may be no init system, and the
# harness runs its own servers. A policy-rc.d answering 101 makes invoke-rc.d skip them.
POLICY_RC_D=/usr/sbin/policy-rc.d
created_policy=
remove_policy() {
  if [ -n "$created_policy" ]; then as_root rm -f "$POLICY_RC_D" || true; fi
}
trap remove_policy EXIT

apt_install() {
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@"
}

install_packages() {
  if [ ! -e "$POLICY_RC_D" ]; then
    as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $POLICY_RC_D && chmod 755 $POLICY_RC_D"
    created_policy=1
  fi
  if ! apt_install "$@"; then
    echo "apt-get install failed; updating package lists and retrying"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    apt_install "$@" || echo "apt-get install reported errors; checking what is installed"
  fi
  remove_policy
  created_policy=
}

phase "system packages (postgresql, rabbitmq-server, redis-server, prometheus, nodejs, npm)"
read -r -a missing <<<"$(missing_packages)"
if [ "${#missing[@]}" -eq 0 ]; then
  echo "all present"
elif ! command -v apt-get >/dev/null 2>&1; then
  echo "missing ${missing[*]} and no apt-get: integration tests need COMPENSA_TEST_*_URL or Docker"
else
  echo "installing ${missing[*]}"
  install_packages "${missing[@]}"
  read -r -a still_missing <<<"$(missing_packages)"
  if [ "${#still_missing[@]}" -ne 0 ]; then
    echo "still missing after apt-get: ${still_missing[*]}" >&2
    exit 1
  fi
fi

phase "virtualenv (.venv)"
bash scripts/setup.sh --dev

# Configured in pyproject.toml; `ruff check --fix .` and `ruff format .` repair most findings.
phase "ruff check (lint)"
.venv/bin/ruff check .

phase "ruff format --check"
.venv/bin/ruff format --check .

phase "mypy (types; cache in .mypy_cache)"
.venv/bin/mypy

phase "pytest $*"
status=0
.venv/bin/python -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
fi
exit "$status"
