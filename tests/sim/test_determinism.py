"""The same seed and options give the same report, byte for byte (wall time aside)."""

from __future__ import annotations

import pytest

from infra.simulation.driver import SimulationResult
from sagas.simulation.faults import profile
from sagas.simulation.report import dumps, to_document, without_wall
from tests.sim.support import simulate

SAGAS = 40


def document(result: SimulationResult) -> str:
    return dumps(without_wall(to_document(result)))


@pytest.fixture(scope="module")
def first() -> SimulationResult:
    return simulate(seed=11, sagas=SAGAS, faults=profile("chaos"))


def test_same_seed_same_document(first: SimulationResult) -> None:
    again = simulate(seed=11, sagas=SAGAS, faults=profile("chaos"))

    assert document(again) == document(first)
    # Chaos really happened, so the comparison covers the fault paths too.
    assert sum(first.faults_injected.values()) > 40
    assert first.ok, first.violations


def test_other_seed_other_document(first: SimulationResult) -> None:
    other = simulate(seed=12, sagas=SAGAS, faults=profile("chaos"))

    assert other.workload.orders != first.workload.orders
    assert document(other) != document(first)


def test_document_keeps_wall_time_apart(first: SimulationResult) -> None:
    full = to_document(first)

    assert set(full) - set(without_wall(full)) == {"wall"}
    assert full["wall"]["seconds"] > 0
    assert full["stack"] == "simulated"


def test_statement_runner_changes_nothing_but_speed(first: SimulationResult, monkeypatch: pytest.MonkeyPatch) -> None:
    """The simulator's direct statement runner and SQLAlchemy's own path give the same run."""
    import infra.simulation.driver
    from infra.simulation.sqlite_facade import create_direct_sqlite_engine

    engines = []

    def engine_without_runner(path: str, **options):  # type: ignore[no-untyped-def]
        engine = create_direct_sqlite_engine(path, **options, statement_runner=False)
        engines.append(engine)
        return engine

    monkeypatch.setattr(infra.simulation.driver, "create_direct_sqlite_engine", engine_without_runner)
    through_sqlalchemy = simulate(seed=11, sagas=SAGAS, faults=profile("chaos"))

    assert engines and engines[0].runner is None
    assert document(through_sqlalchemy) == document(first)
