#!/usr/bin/env bash
# Start PostgreSQL and RabbitMQ from local binaries (or use COMPENSA_DATABASE_URL /
# COMPENSA_AMQP_URL when both are set) and run the benchmarks in one go.
#   bash scripts/bench.sh                 # relay, saga and simulation benchmarks
#   bash scripts/bench.sh relay --messages 5000
set -euo pipefail
cd "$(dirname "$0")/.."
# The DBOS peer of `bench saga` comes with the bench extra.
.venv/bin/python -c 'import dbos' 2>/dev/null || bash scripts/setup.sh --bench
run_benchmarks() {
  if [ "$#" -gt 0 ]; then
    .venv/bin/compensa bench "$@"
  else
    .venv/bin/compensa bench relay
    .venv/bin/compensa bench saga
    .venv/bin/compensa bench simulate --sagas 10000
  fi
}
if [ -n "${COMPENSA_DATABASE_URL:-}" ] && [ -n "${COMPENSA_AMQP_URL:-}" ]; then
  run_benchmarks "$@"
  exit
fi
exports=$(mktemp)
.venv/bin/python -m tests.harness.servers postgres rabbitmq >"$exports" &
harness=$!
trap 'kill -TERM $harness 2>/dev/null; wait $harness 2>/dev/null; rm -f "$exports"' EXIT
for _ in $(seq 1 120); do
  grep -q COMPENSA_AMQP_URL "$exports" 2>/dev/null && grep -q COMPENSA_DATABASE_URL "$exports" && break
  kill -0 $harness 2>/dev/null || { echo "test servers failed to start" >&2; exit 1; }
  sleep 1
done
# shellcheck disable=SC1090
source <(grep '^export COMPENSA_' "$exports" | grep -v COMPENSA_TEST_)
run_benchmarks "$@"
