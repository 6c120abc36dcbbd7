"""Replay every seed in regressions.json; `--save-seed` adds failing runs to such a file, `--replay` runs one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from infra.simulation.driver import run_simulation
from infra.simulation.swarm import RunSpec
from sagas.simulation.faults import profile
from sagas.simulation.regressions import OPTIONAL_KEYS, load_regressions, save_regression
from tests.sim.test_cli import compensa, plain

ROOT = Path(__file__).resolve().parents[2]

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


#: Swarm-free runs of the release that forgets the stock: this one breaks "no stock left reserved".
BROKEN = "tests.sim.support:STOCK_NEVER_RELEASED_VARIANT"
FAILING_ENTRY = {
    "seed": 2,
    "sagas": 12,
    "faults": "none",
    "overrides": {"duplicate": 0.2},
    "decline_rate": 0.5,
    "variant": BROKEN,
}
PASSING_ENTRY = {"seed": 3, "sagas": 15, "faults": "chaos", "overrides": {}}


def test_replay_runs_every_entry_of_a_file_that_passes(tmp_path: Path) -> None:
    path = tmp_path / "regressions.json"
    path.write_text(json.dumps([PASSING_ENTRY, PASSING_ENTRY | {"seed": 4, "overrides": {"silence": 0.2}}]))

    run = compensa("--replay", str(path), cwd=ROOT)

    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "✓ seed 3: ok: compensa simulate --seed 3 --sagas 15 --faults chaos"
    assert lines[1] == "✓ seed 4: ok: compensa simulate --seed 4 --sagas 15 --faults chaos --fault silence=0.2"
    assert lines[2] == f"replayed 2 runs from {path}: 0 failed"


def test_replay_fails_when_an_entry_breaks_an_invariant(tmp_path: Path) -> None:
    path = tmp_path / "regressions.json"
    path.write_text(json.dumps([PASSING_ENTRY, FAILING_ENTRY]))

    run = compensa("--replay", str(path), cwd=ROOT)
    as_json = compensa("--replay", str(path), "--json", "--workers", "1", cwd=ROOT)

    assert run.returncode == 1, run.stderr
    failed = next(line for line in run.stdout.splitlines() if line.startswith("✗"))
    assert failed.startswith("✗ seed 2: ") and "(no stock left reserved" in failed
    assert failed.endswith(RunSpec.from_regression(FAILING_ENTRY).command())
    assert f"replayed 2 runs from {path}: 1 failed" in run.stdout
    assert as_json.returncode == 1, as_json.stderr
    document = json.loads(as_json.stdout)
    assert document["ok"] is False and document["runs"] == 2 and document["failed"] == 1
    assert [entry["ok"] for entry in document["entries"]] == [True, False]
    assert "no stock left reserved" in document["entries"][1]["invariants_broken"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "No such file or directory"),
        ("{", "not JSON"),
        ("[]", "expected a non-empty JSON list of runs"),
        ('[{"seed": 1, "sagas": 5}]', "entry 1: not a regression entry: missing faults"),
        (
            '[{"seed": 1, "sagas": 5, "faults": "none", "colour": "blue"}]',
            "entry 1: not a regression entry: unknown key(s) colour",
        ),
        ('[{"seed": 1, "sagas": 5, "faults": "sometimes"}]', "entry 1: unknown fault profile 'sometimes'"),
        ('[{"seed": 1, "sagas": 5, "faults": "none", "app": "nosuch:app"}]', "entry 1: --app nosuch:app: no module named"),
    ],
    ids=["missing", "not-json", "empty", "incomplete", "unknown-key", "profile", "app"],
)
def test_a_regression_file_that_cannot_replay_is_one_line_and_exit_2(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "regressions.json"
    if content is not None:
        path.write_text(content)

    run = compensa("--replay", str(path), cwd=ROOT)

    assert run.returncode == 2 and run.stdout == "" and "Traceback" not in run.stderr
    assert run.stderr.startswith(f"error: --replay {path}: ") and message in run.stderr
    assert run.stderr.count("\n") == 1


def test_replay_refuses_options_the_entries_give(tmp_path: Path) -> None:
    path = tmp_path / "regressions.json"
    path.write_text(json.dumps([PASSING_ENTRY]))

    run = compensa("--replay", str(path), "--sagas", "3", "--faults", "chaos")

    assert run.returncode == 2
    assert "each entry of the file says its own run; --sagas, --faults cannot apply" in plain(run.stderr)
