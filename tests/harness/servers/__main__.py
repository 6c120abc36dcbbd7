"""``python -m tests.harness.servers [SERVICE...]``: keep servers running for a shell session."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence

from tests.harness.servers.base import SERVICES
from tests.harness.servers.resolve import local_servers


def main(argv: Sequence[str] | None = None) -> int:
    """Keep servers running for a shell session until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m tests.harness.servers", description=main.__doc__)
    parser.add_argument("services", nargs="*", metavar="SERVICE", help=f"any of {sorted(SERVICES)}; default: all")
    args = parser.parse_args(argv)
    if unknown := set(args.services) - SERVICES:
        parser.error(f"unknown services {sorted(unknown)}; choose from {sorted(SERVICES)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        with local_servers(args.services or SERVICES) as servers:
            print(servers.exports(), flush=True)
            print("# servers running; Ctrl-C or SIGTERM stops them", file=sys.stderr, flush=True)
            while True:
                signal.pause()
    except KeyboardInterrupt:
        print("# servers stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
