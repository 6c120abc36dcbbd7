"""Your own saga, simulated: the trip booking example (examples/trip) through `--app`.

The same simulator that runs the order saga runs the trip app: its handlers on SQLite,
the in-memory broker, the virtual clock, every fault. Its invariants hold under faults;
a variant whose saga forgets to cancel the car is caught by a swarm, shrunk, saved, and
the saved file replays the failure.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.apps import load_app
from infra.simulation.driver import SimulationOptions, run_simulation
from infra.simulation.swarm import RunSpec, check_determinism, default_workers, run_one, run_swarm
from sagas.simulation.faults import profile
from sagas.simulation.regressions import load_regressions
from sagas.simulation.workload import WorkloadSpec
from tests.sim.test_cli import compensa as run_compensa
from tests.sim.test_cli import plain
from tests.support import contracts_of_apps_forgotten

ROOT = Path(__file__).resolve().parents[2]
TRIP = "examples.trip.app:app"
CAR_NEVER_CANCELLED = "examples.trip.broken:app"
NOTHING_TO_SIMULATE = "tests.sim.support:TRIP_WITHOUT_SIMULATION"
LEFT_BOOKED = "no booking left for a trip that did not go ahead"


@pytest.fixture(autouse=True)
def _forget_app_contracts() -> Iterator[None]:
    with contracts_of_apps_forgotten():
        yield


def compensa(*args: str):  # type: ignore[no-untyped-def]
    return run_compensa(*args, cwd=ROOT)


@pytest.mark.parametrize("faults", ["none", "default", "chaos"])
def test_trip_app_keeps_its_invariants_under_faults(faults: str) -> None:
    app = load_app(TRIP, str(ROOT))
    result = run_simulation(
        SimulationOptions(seed=3, workload=WorkloadSpec(sagas=60), faults=profile(faults, {}, seed=3), app=app)
    )

    assert result.violations == []
    assert sum(result.outcomes.values()) == 60
    # Hotels are the scarcest: some trips unwind a booked flight and car.
    assert result.outcomes.get("completed", 0) > 0 and result.outcomes.get("cancelled", 0) > 0
    assert result.coverage["trip_unwound"] > 0


def test_trip_simulation_from_the_command_line() -> None:
    run = compensa("--app", TRIP, "-n", "25", "--faults", "chaos", "--require", "trip_unwound", "--json")

    assert run.returncode == 0, run.stderr
    document = json.loads(run.stdout)
    assert document["workload"] == {"app": "trip", "sagas": 25}
    assert document["invariants"] == {"ok": True, "violations": []}
    assert set(document["outcomes"]) <= {"completed", "cancelled", "rejected"}
    assert document["coverage"]["trip_unwound"] > 0
    assert document["unmet_goals"] == []


def test_an_unknown_goal_names_the_apps_goals_too() -> None:
    run = compensa("--app", TRIP, "-n", "5", "--require", "nonsense")

    assert run.returncode == 2
    assert "unknown coverage goal(s) nonsense" in run.stderr and "trip_unwound" in run.stderr


def test_a_trip_seed_replays_exactly() -> None:
    found = check_determinism(RunSpec(seed=5, sagas=20, faults="chaos", app=TRIP, app_path=str(ROOT)))

    assert found.ok, found.as_dict()


def test_a_saga_that_forgets_to_cancel_the_car_is_caught_by_a_swarm_shrunk_saved_and_replayed(tmp_path: Path) -> None:
    saved = tmp_path / "regressions.json"
    started = time.perf_counter()
    run = compensa("--app", CAR_NEVER_CANCELLED, "--swarm", "50", "--sagas", "12", "--save-seed", str(saved), "--json")
    seconds = time.perf_counter() - started

    assert run.returncode == 1, run.stderr
    swarm = json.loads(run.stdout)
    assert swarm["failures"], "50 seeds of a saga that leaves cars booked: at least one must fail"
    assert all(LEFT_BOOKED in failure["invariants_broken"] for failure in swarm["failures"])
    assert all(f"--app {CAR_NEVER_CANCELLED}" in failure["command"] for failure in swarm["failures"])
    # Shrunk by default: one run per way of failing, the first seed that failed so.
    assert swarm["shrunk"] and len(swarm["shrunk"]) <= len(swarm["failures"])
    shrunk = swarm["shrunk"][0]
    original = RunSpec.swarm_seed(shrunk["seed"], sagas=12, operator_after=60.0, app=CAR_NEVER_CANCELLED, app_path=str(ROOT))
    assert shrunk["from_command"] == original.command()
    print(
        f"\ntrip swarm: {len(swarm['failures'])}/50 seeds failed, {swarm['wall']['seconds']:.1f} s on {swarm['workers']} "
        f"processes; {len(swarm['shrunk'])} shrunk, seed {shrunk['seed']} {original.sagas} -> {shrunk['sagas']} sagas "
        f"in {shrunk['runs']} runs, {shrunk['seconds']:.1f} s; the whole command {seconds:.1f} s: {shrunk['command']}"
    )

    # Smaller on at least one axis (sagas, faults on, a rate), larger on none.
    before, after = original.fault_fields(), shrunk["faults"]
    assert shrunk["sagas"] <= original.sagas and set(after) <= set(before)
    assert all(after[name] <= before[name] for name in after)
    assert shrunk["sagas"] < original.sagas or set(after) < set(before) or any(after[n] < before[n] for n in after)

    # The saved file holds the shrunk runs, and replaying it reproduces the failure.
    smallest = original.with_faults(shrunk["sagas"], after)
    assert smallest.command() == shrunk["command"]
    entries = load_regressions(saved)
    assert entries == [original.with_faults(s["sagas"], s["faults"]).regression_entry() for s in swarm["shrunk"]]
    assert RunSpec.from_regression(entries[0], str(ROOT)) == smallest
    assert swarm["saved_to"] == str(saved)
    replay = compensa("--replay", str(saved))
    assert replay.returncode == 1, replay.stderr
    first = replay.stdout.splitlines()[0]
    assert first.startswith(f"✗ seed {shrunk['seed']}: ") and LEFT_BOOKED in first and first.endswith(shrunk["command"])


def test_an_app_runs_saved_entry_names_the_app_and_replays_from_its_directory(tmp_path: Path) -> None:
    """`--save-seed` of an `--app` run (it once raised: the entry's `app` key was unknown)."""
    saved = tmp_path / "regressions.json"
    run = compensa(
        "--app",
        CAR_NEVER_CANCELLED,
        "--seed",
        "1",
        "-n",
        "12",
        "--faults",
        "none",
        "--operator-after",
        "60",
        "--no-shrink",
        "--save-seed",
        str(saved),
    )

    assert run.returncode == 1, run.stderr
    assert f"saved to {saved}: 1 failing run" in run.stdout
    (entry,) = load_regressions(saved)
    assert entry == {
        "seed": 1,
        "sagas": 12,
        "faults": "none",
        "overrides": {},
        "operator_after": 60.0,
        "app": CAR_NEVER_CANCELLED,
    }
    spec = RunSpec.from_regression(entry, str(ROOT))
    assert spec.app == CAR_NEVER_CANCELLED and spec.app_path == str(ROOT) and spec.variant_path is None
    assert RunSpec.from_regression(entry).app_path is None  # the working directory, when the run loads it
    again = run_one(spec)
    assert not again.ok and LEFT_BOOKED in again.invariants


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--skus", "3"], "Invalid value for --skus: --skus shapes the order workload; app 'trip' draws its own sagas"),
        (
            ["--decline-rate", "0.1", "--stock-per-sku", "4"],
            "Invalid value for --stock-per-sku: --stock-per-sku, --decline-rate shape the order workload",
        ),
    ],
    ids=["skus", "two"],
)
def test_order_only_options_with_another_app_are_refused(args: list[str], message: str) -> None:
    run = compensa("--app", TRIP, "-n", "5", *args)

    assert run.returncode == 2 and run.stdout == ""
    assert message in plain(run.stderr)


def test_an_app_without_simulation_pieces_is_one_line_and_exit_2() -> None:
    run = compensa("--app", NOTHING_TO_SIMULATE, "-n", "5")

    assert run.returncode == 2 and run.stdout == "" and "Traceback" not in run.stderr
    assert run.stderr == (
        f"error: --app {NOTHING_TO_SIMULATE}: app 'trip' has no simulation pieces (SagaApp.simulation: a workload and "
        "invariants); docs/tutorial.md shows how to add them\n"
    )


def test_the_correct_trip_app_passes_the_same_swarm_seeds() -> None:
    """The control: the same seeds (a sample) with the car's cancellation in place keep every invariant."""
    specs = [RunSpec.swarm_seed(seed, sagas=20, operator_after=60.0, app=TRIP, app_path=str(ROOT)) for seed in range(1, 7)]

    swarm = run_swarm(specs, default_workers())

    assert swarm.failures == []
