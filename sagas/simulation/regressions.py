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


#: Keys an entry may carry besides seed, sagas, faults and overrides (a run's other
#: non-default options: a variant, the saga application, liveness, the simulated
#: operator, the workload's shape).
OPTIONAL_KEYS = frozenset(
    {
        "variant",
        "app",
        "liveness",
        "heal_after",
        "liveness_bound",
        "operator_after",
        "skus",
        "stock_per_sku",
        "decline_rate",
    }
)


def save_regression(path: Path, *, seed: int, sagas: int, faults: str, overrides: dict[str, float], **options: Any) -> None:
    """Append a failing run's options, once, so the suite replays it from now on.

    `options` are the run's other settings (`OPTIONAL_KEYS`), stored only when given.
    """
    unknown = sorted(set(options) - OPTIONAL_KEYS)
    if unknown:
        raise ValueError(f"unknown regression option(s) {', '.join(unknown)}")
    entries = load_regressions(path)
    entry = {"seed": seed, "sagas": sagas, "faults": faults, "overrides": dict(sorted(overrides.items()))}
    entry.update({key: value for key, value in sorted(options.items()) if value is not None})
    if entry not in entries:
        entries.append(entry)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(entries, indent=2) + "\n")
