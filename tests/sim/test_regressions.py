"""Replay every seed in regressions.json; `--save-seed` adds failing runs to such a file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from infra.simulation.driver import run_simulation
from infra.simulation.swarm import RunSpec
from sagas.simulation.faults import profile
from sagas.simulation.regressions import OPTIONAL_KEYS, load_regressions, save_regression

REGRESSIONS = Path(__file__).with_name("regressions.json")
ENTRIES = load_regressions(REGRESSIONS)


def _id(entry: dict[str, Any]) -> str:
    extra = ",".join(f"{k}={v}" for k, v in entry["overrides"].items())
    return f"seed{entry['seed']}-{entry['sagas']}-{entry['faults']}" + (f"+{extra}" if extra else "")


def test_regression_file_is_well_formed() -> None:
    assert ENTRIES, "regressions.json lists no seeds"
    for entry in ENTRIES:
        assert {"seed", "sagas", "faults", "overrides"} <= set(entry) <= {"seed", "sagas", "faults", "overrides"} | OPTIONAL_KEYS
        # These seeds replay the product as built: a broken variant's seed belongs elsewhere.
        assert "variant" not in entry
        profile(entry["faults"], entry["overrides"], seed=entry["seed"])  # raises on an unknown profile or fault


@pytest.mark.parametrize("entry", ENTRIES, ids=[_id(e) for e in ENTRIES])
def test_regression_seed_keeps_every_invariant(entry: dict[str, Any]) -> None:
    result = run_simulation(RunSpec.from_regression(entry).options())

    assert result.violations == []
    assert sum(result.outcomes.values()) == entry["sagas"]


def test_save_regression_appends_each_run_once(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "regressions.json"
    assert load_regressions(path) == []

    save_regression(path, seed=7, sagas=50, faults="chaos", overrides={"silence": 0.2, "duplicate": 0.5})
    save_regression(path, seed=7, sagas=50, faults="chaos", overrides={"duplicate": 0.5, "silence": 0.2})
    save_regression(path, seed=8, sagas=50, faults="chaos", overrides={})

    assert load_regressions(path) == [
        {"seed": 7, "sagas": 50, "faults": "chaos", "overrides": {"duplicate": 0.5, "silence": 0.2}},
        {"seed": 8, "sagas": 50, "faults": "chaos", "overrides": {}},
    ]
    assert path.read_text().endswith("\n")


def test_saved_entry_keeps_the_runs_other_options(tmp_path: Path) -> None:
    path = tmp_path / "regressions.json"
    spec = RunSpec.swarm_seed(4, sagas=12, decline_rate=0.0, liveness=True, operator_after=60.0)
    save_regression(path, **spec.regression_entry())
    (entry,) = load_regressions(path)

    assert entry["liveness"] is True and entry["operator_after"] == 60.0 and entry["decline_rate"] == 0.0
    assert RunSpec.from_regression(entry) == spec
    with pytest.raises(ValueError, match="unknown regression option"):
        save_regression(path, seed=1, sagas=1, faults="none", overrides={}, colour="blue")


def test_saved_entry_replays_with_the_same_options(tmp_path: Path) -> None:
    path = tmp_path / "regressions.json"
    save_regression(path, seed=5, sagas=10, faults="default", overrides={"duplicate": 0.4})
    (entry,) = load_regressions(path)

    rates = profile(entry["faults"], entry["overrides"])
    assert rates.duplicate == 0.4
    assert rates.reorder == profile("default").reorder
