"""Your own saga, simulated: the trip booking example (examples/trip) through `--app`.

The same simulator that runs the order saga runs the trip app: its handlers on SQLite,
the in-memory broker, the virtual clock, every fault. Its invariants hold under faults;
a variant whose saga forgets to cancel the car is caught by a swarm, shrunk, and the
shrunk seed reproduces it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.apps import load_app
from infra.simulation.driver import SimulationOptions, run_simulation
from infra.simulation.swarm import RunSpec, check_determinism, default_workers, run_one, run_swarm, shrink_failure
from sagas.simulation.faults import profile
from sagas.simulation.workload import WorkloadSpec
from tests.sim.test_cli import compensa as run_compensa
from tests.support import contracts_of_apps_forgotten

ROOT = Path(__file__).resolve().parents[2]
TRIP = "examples.trip.app:app"
CAR_NEVER_CANCELLED = "examples.trip.broken:app"
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


def test_a_saga_that_forgets_to_cancel_the_car_is_caught_by_a_swarm_shrunk_and_reproduced() -> None:
    specs = [
        RunSpec.swarm_seed(seed, sagas=12, operator_after=60.0, app=CAR_NEVER_CANCELLED, app_path=str(ROOT))
        for seed in range(1, 51)
    ]
    started = time.perf_counter()
    swarm = run_swarm(specs, default_workers())
    swarm_seconds = time.perf_counter() - started

    assert swarm.failures, "50 seeds of a saga that leaves cars booked: at least one must fail"
    assert all(LEFT_BOOKED in outcome.invariants for outcome in swarm.failures)
    first = swarm.failures[0]
    assert f"--app {CAR_NEVER_CANCELLED}" in first.spec.command()

    shrunk = shrink_failure(first.spec)
    again = run_one(shrunk.spec)

    print(
        f"\ntrip swarm: {len(swarm.failures)}/50 seeds failed in {swarm_seconds:.1f} s on {swarm.workers} processes; "
        f"seed {first.seed} shrunk {first.spec.sagas} -> {shrunk.spec.sagas} sagas in {shrunk.runs} runs, "
        f"{shrunk.seconds:.1f} s: {shrunk.spec.command()}"
    )
    assert shrunk.spec.sagas <= first.spec.sagas
    assert not again.ok and LEFT_BOOKED in again.invariants
    # The violation names the trip and the car it left booked.
    violation = next(v for v in again.violations if v["invariant"] == LEFT_BOOKED)
    assert violation["saga_id"].startswith("trip-") and violation["detail"].startswith("cars: CAR-")


def test_the_correct_trip_app_passes_the_same_swarm_seeds() -> None:
    """The control: the same seeds (a sample) with the car's cancellation in place keep every invariant."""
    specs = [RunSpec.swarm_seed(seed, sagas=20, operator_after=60.0, app=TRIP, app_path=str(ROOT)) for seed in range(1, 7)]

    swarm = run_swarm(specs, default_workers())

    assert swarm.failures == []
