"""Shrinking: a failing run reduced to the smallest that still fails, saved and replayed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infra.simulation.swarm import RunSpec, run_one, shrink_failure
from sagas.simulation.regressions import load_regressions
from sagas.simulation.shrink import Candidate, shrink
from tests.sim.test_cli import compensa, plain

ROOT = Path(__file__).resolve().parents[2]
BROKEN = "tests.sim.support:STOCK_NEVER_RELEASED_VARIANT"


def failing_swarm_seed() -> RunSpec:
    """Swarm seed 1 (nine faults on) with the release that forgets the stock; no declines."""
    return RunSpec.swarm_seed(1, sagas=30, decline_rate=0.0, operator_after=60.0, variant=BROKEN, variant_path=str(ROOT))


def test_shrink_search_is_greedy_and_bounded() -> None:
    """A made-up failure: any run of 5+ sagas with `duplicate` on fails."""
    start = Candidate.of(40, {"duplicate": 0.2, "reorder": 0.3, "delay": 0.1, "max_delay_seconds": 30.0})
    tried: list[Candidate] = []

    def fails(candidate: Candidate) -> bool:
        tried.append(candidate)
        return candidate.sagas >= 5 and candidate.rates.get("duplicate", 0) > 0

    found = shrink(start, fails)
    assert found.candidate.sagas == 5
    assert set(found.candidate.rates) == {"duplicate"}  # the delay's companion went with it
    assert found.candidate.rates["duplicate"] < 0.2
    assert found.runs == len(tried)
    assert shrink(start, fails, budget=3).runs == 3


def test_a_failing_swarm_seed_shrinks_and_the_shrunk_run_reproduces() -> None:
    spec = failing_swarm_seed()
    original = run_one(spec)
    assert not original.ok

    shrunk = shrink_failure(spec)

    assert shrunk.spec.seed == spec.seed
    assert shrunk.spec.sagas < spec.sagas
    on = [name for name, value in shrunk.spec.overrides if not name.endswith("_seconds") and value]
    assert len(on) < len([name for name, value in spec.overrides if not name.endswith("_seconds") and value])
    assert shrunk.steps and shrunk.runs > 1
    print(f"\nshrink: {spec.sagas} -> {shrunk.spec.sagas} sagas, {shrunk.runs} runs, {shrunk.seconds:.2f} s: {shrunk.steps}")
    again = run_one(shrunk.spec)
    assert not again.ok
    assert set(again.invariants) & set(original.invariants)
    assert again.invariants == shrunk.invariants


@pytest.mark.parametrize("as_json", [False, True], ids=["terminal", "json"])
def test_a_failing_run_is_shrunk_and_the_shrunk_seed_saved_by_default(tmp_path: Path, as_json: bool) -> None:
    path = tmp_path / "regressions.json"
    args = ["-n", "12", "--seed", "2", "--decline-rate", "0.5", "--fault", "duplicate=0.2", "--faults", "none"]
    run = compensa(*args, "--variant", BROKEN, "--save-seed", str(path), *(["--json"] if as_json else []), cwd=ROOT)

    assert run.returncode == 1, run.stderr
    (entry,) = load_regressions(path)
    assert entry["variant"] == BROKEN and entry["sagas"] < 12 and entry["seed"] == 2
    shrunk = RunSpec.from_regression(entry, str(ROOT))
    assert not run_one(shrunk).ok, "the saved seed reproduces the failure"
    if as_json:
        document = json.loads(run.stdout)
        assert document["shrunk"]["command"] == shrunk.command()
        assert document["saved_to"] == str(path)
    else:
        assert f"reproduce: {shrunk.command()}" in plain(run.stdout)
        assert "shrunk seed 2 in" in plain(run.stdout)
        assert f"saved to {path}: 1 failing run (replay: compensa simulate --replay {path})" in plain(run.stdout)


def test_no_shrink_saves_the_run_as_it_failed_and_no_save_seed_saves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "regressions.json"
    args = [
        "-n",
        "12",
        "--seed",
        "2",
        "--decline-rate",
        "0.5",
        "--fault",
        "duplicate=0.2",
        "--faults",
        "none",
        "--variant",
        BROKEN,
    ]

    kept = compensa(*args, "--no-shrink", "--save-seed", str(path), "--json", cwd=ROOT)
    assert kept.returncode == 1, kept.stderr
    assert "shrunk" not in json.loads(kept.stdout)
    (entry,) = load_regressions(path)
    assert entry == {
        "seed": 2,
        "sagas": 12,
        "faults": "none",
        "overrides": {"duplicate": 0.2},
        "decline_rate": 0.5,
        "variant": BROKEN,
    }

    unsaved = compensa(*args, "--no-shrink", "--no-save-seed", cwd=ROOT)
    assert unsaved.returncode == 1 and "saved to" not in unsaved.stdout
    both = compensa(*args, "--no-save-seed", "--save-seed", str(path))
    assert both.returncode == 2 and "give --save-seed PATH or --no-save-seed, not both" in plain(both.stderr)
