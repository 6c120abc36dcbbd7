"""The determinism self-check's second run, in a fresh interpreter (`python -m infra.simulation.second_run`).

Reads a pickled `RunSpec` on stdin, runs it traced, and writes the pickled trace and
final report (wall time aside) on stdout. `check_determinism` starts it with another
PYTHONHASHSEED than its own, so a run whose behaviour follows the hash order of
strings (iterating a set of ids) diverges from the first.
"""

from __future__ import annotations

import pickle
import sys


def main() -> None:
    from infra.logging import configure_logging
    from infra.simulation.swarm import traced_run

    configure_logging("CRITICAL", "json")
    spec = pickle.loads(sys.stdin.buffer.read())  # noqa: S301 - written by our own parent process
    sys.stdout.buffer.write(pickle.dumps(traced_run(spec)))


if __name__ == "__main__":
    main()
