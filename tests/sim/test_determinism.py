"""The same seed and options give the same report, byte for byte (wall time aside)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

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


def test_the_inline_engine_changes_nothing_but_speed(
    first: SimulationResult, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The simulator's inline SQLite facade and the aiosqlite engine production uses give the same run."""
    import infra.simulation.driver
    from infra.db import create_engine

    engines = []

    def async_engine(path: str, **_options: object) -> AsyncEngine:
        engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'async.db'}")
        engines.append(engine)
        return engine

    monkeypatch.setattr(infra.simulation.driver, "create_direct_sqlite_engine", async_engine)
    through_asyncio = simulate(seed=11, sagas=SAGAS, faults=profile("chaos"))

    assert engines and isinstance(engines[0], AsyncEngine)
    assert document(through_asyncio) == document(first)
