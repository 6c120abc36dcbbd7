"""The Compose Specification's JSON Schema, as Docker's own Compose release ships it.

No package ships the compose-spec schema by itself; docker-compose 1.29.2 (PyPI, Docker's
last Python release of Compose, the one Debian 12 packages) carries it as
``compose/config/compose_spec.json`` and validates every file against it. ``schema()``
downloads that wheel with pip once into ``.cache/compose-spec/`` (not committed; nothing
is installed into the venv: its pins would clash with ours) and reads the schema from it.
The schema is of 2021: newer Compose accepts more, never less, for the keys used here.
"""

from __future__ import annotations

import fcntl
import json
import sys
import zipfile
from pathlib import Path
from typing import Any

from tests.harness.servers.base import HarnessError
from tests.harness.servers.process import run_command

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "compose-spec"
DOCKER_COMPOSE = "docker-compose==1.29.2"
MEMBER = "compose/config/compose_spec.json"


def schema() -> dict[str, Any]:
    """The compose-spec JSON Schema (draft 2019-09); downloaded on first use."""
    CACHE.mkdir(parents=True, exist_ok=True)
    target = CACHE / "compose_spec.json"
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            run_command(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", CACHE, DOCKER_COMPOSE],
                what=f"pip download {DOCKER_COMPOSE}",
                timeout=600,
            )
            wheels = sorted(CACHE.glob("docker_compose-1.29.2-*.whl"))
            if not wheels:
                raise HarnessError(f"pip download {DOCKER_COMPOSE} left no wheel in {CACHE}")
            with zipfile.ZipFile(wheels[0]) as wheel:
                target.write_bytes(wheel.read(MEMBER))
    return dict(json.loads(target.read_text()))
