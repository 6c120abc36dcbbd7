"""Liveness: once faults stop, every saga reaches an outcome within a bound; a stuck one fails the run."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

from infra.simulation.driver import run_simulation
from infra.simulation.swarm import RunSpec
from sagas.order_saga import ORDER_SAGA
from sagas.simulation import liveness
from sagas.simulation.faults import FaultRates, profile
from sagas.simulation.report import terminal_summary, to_document
from tests.sim.test_cli import compensa

ROOT = Path(__file__).resolve().parents[2]
SILENT = "tests.sim.support:STOCK_NEVER_ANSWERS_VARIANT"


def test_default_bound_comes_from_the_deadlines() -> None:
    bound = liveness.default_bound([ORDER_SAGA], FaultRates(), retry_max_seconds=8.0, max_attempts=5)

    # 3 steps of 30 s, 5 + 1 compensation rounds of 30 s, a 45 s silence, 5 retries of 8 s.
    assert bound == 90 + 180 + 45 + 40
    assert liveness.default_bound([ORDER_SAGA], FaultRates(), retry_max_seconds=8.0, max_attempts=5, operator_after=60) == (
        bound + 60 + 180
    )


def test_the_product_is_live_once_faults_stop() -> None:
    result = run_simulation(RunSpec(seed=3, sagas=30, faults="chaos", heal_after=10.0).options())

    assert result.ok, result.violations
    assert result.liveness == {"heal_at_seconds": 10.0, "bound_seconds": 355.0 + 5.0 + 2.0}  # a broker restart's 5 s + 2 s
    assert "liveness:        faults stopped at 10.0 s" in terminal_summary(to_document(result))


def test_faults_stop_at_the_heal() -> None:
    """Heal at 0: the chaos profile injects nothing at all, so the run is a fault-free one."""
    healed = run_simulation(RunSpec(seed=4, sagas=20, faults="chaos", heal_after=0.0).options())

    assert sum(healed.faults_injected.values()) == 0
    assert healed.ok


def test_a_participant_that_never_answers_is_caught_with_its_history() -> None:
    options = RunSpec(seed=5, sagas=20, faults="default", liveness=True, variant=SILENT, variant_path=str(ROOT)).options()
    result = run_simulation(options)

    stuck = [v for v in result.violations if v.invariant == liveness.INVARIANT]
    assert stuck, result.violations
    declined = {v.saga_id for v in stuck}
    assert all("stuck compensation_failed" in v.detail for v in stuck)
    document = to_document(result)
    for saga_id in declined:
        history = document["violating_sagas"][saga_id]
        assert history[0]["trigger"] == "order.created"
        assert history[-1]["to"] == "compensation_failed"
        assert sum(1 for entry in history if entry["trigger"].startswith("deadline:compensation")) == 5
    # The run stops at the bound instead of waiting for a saga that cannot end.
    heal = result.liveness["heal_at_seconds"]  # type: ignore[index]
    assert result.virtual_seconds <= heal + result.liveness["bound_seconds"] + 60  # type: ignore[index]
    assert timedelta(seconds=result.virtual_seconds) > ORDER_SAGA.compensation_deadline * 5


def test_liveness_from_the_command_line() -> None:
    run = compensa(
        "-n", "20", "--seed", "5", "--heal-after", "5", "--variant", SILENT, "--json", "--no-shrink", "--no-save-seed", cwd=ROOT
    )

    assert run.returncode == 1
    document = json.loads(run.stdout)
    assert document["liveness"]["heal_at_seconds"] == 5.0
    stuck = [v for v in document["invariants"]["violations"] if v["invariant"] == liveness.INVARIANT]
    assert stuck and all(document["violating_sagas"][v["saga_id"]] for v in stuck)


def test_the_operator_retries_but_cannot_make_a_silent_participant_answer() -> None:
    options = RunSpec(
        seed=5, sagas=20, faults="none", liveness=True, operator_after=30.0, variant=SILENT, variant_path=str(ROOT)
    ).options()
    result = run_simulation(options)

    assert result.operator is not None and result.operator["compensations_retried"] > 0
    assert result.coverage["compensation_failed"] > 0
    assert any(v.invariant == liveness.INVARIANT for v in result.violations)
    assert profile("none") == options.faults
