"""A seed replays the same run whatever COMPENSA_* the environment sets."""

from __future__ import annotations

import pytest

from infra.simulation.driver import SimulationOptions, run_simulation
from sagas.simulation.faults import profile
from sagas.simulation.report import dumps, to_document, without_wall
from sagas.simulation.workload import WorkloadSpec


def test_environment_settings_do_not_change_a_simulation(monkeypatch: pytest.MonkeyPatch) -> None:
    options = SimulationOptions(seed=7, workload=WorkloadSpec(sagas=40, stock_per_sku=1000), faults=profile("none"))
    plain = dumps(without_wall(to_document(run_simulation(options))))
    # With these honoured, every charge would be declined and reservations would lapse.
    monkeypatch.setenv("COMPENSA_PAYMENT_AMOUNT_LIMIT", "1")
    monkeypatch.setenv("COMPENSA_RESERVATION_TTL_SECONDS", "0.001")
    changed = dumps(without_wall(to_document(run_simulation(options))))
    assert changed == plain
