"""Seeds that once found a bug, kept in a file the test suite replays."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load_regressions(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    entries: list[dict[str, Any]] = json.loads(path.read_text())
    return entries


def save_regression(path: Path, *, seed: int, sagas: int, faults: str, overrides: dict[str, float]) -> None:
    """Append a failing run's options, once, so the suite replays it from now on."""
    entries = load_regressions(path)
    entry = {"seed": seed, "sagas": sagas, "faults": faults, "overrides": dict(sorted(overrides.items()))}
    if entry not in entries:
        entries.append(entry)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(entries, indent=2) + "\n")
