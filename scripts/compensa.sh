#!/usr/bin/env bash
# Set up .venv on first use, then run the compensa command line.
#   bash scripts/compensa.sh simulate          # the main job: no servers needed
#   bash scripts/compensa.sh --help
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
if [ ! -x "$root/.venv/bin/compensa" ]; then
  bash "$root/scripts/setup.sh" >&2
fi
exec "$root/.venv/bin/compensa" "$@"
