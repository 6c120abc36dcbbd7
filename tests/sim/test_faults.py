"""Each fault alone, at a rate far above any profile's: injected, survived, invariants hold."""

from __future__ import annotations

import pytest

from infra.simulation.driver import SimulationResult
from sagas.simulation.faults import RATE_NAMES, FaultRates
from tests.sim.support import simulate

SAGAS = 30

#: The recovery work each fault must cause, as the broker and consumers count it.
EVIDENCE = {
    "duplicate": "duplicates_skipped",
    "lost_ack": "requeued",
    "consumer_crash": "requeued",
    "relay_crash": "duplicates_skipped",
    "transient_error": "retried",
    "permanent_error": "dead_lettered",
    "gateway_outage": "retried",
    "broker_restart": "returned_on_restart",
    "commit_unknown": "duplicates_skipped",
}
#: Faults that only change how another strikes, tried with that one.
WITH = {"burst": {"consumer_crash": 0.05}}


@pytest.fixture(scope="module")
def baseline() -> SimulationResult:
    return simulate(sagas=SAGAS)


def test_no_faults_no_violations(baseline: SimulationResult) -> None:
    assert baseline.ok, baseline.violations
    assert not baseline.faults_injected
    assert sum(baseline.outcomes.values()) == SAGAS
    assert baseline.counters["duplicates_skipped"] == 0
    assert baseline.counters["dead_lettered"] == 0


@pytest.mark.parametrize("fault", RATE_NAMES)
def test_fault_alone_keeps_every_invariant(fault: str, baseline: SimulationResult) -> None:
    rate = 0.1 if fault == "permanent_error" else 0.3
    result = simulate(sagas=SAGAS, faults=FaultRates(**{fault: rate}, **WITH.get(fault, {})))

    assert result.violations == []
    assert result.faults_injected[fault] > 0
    assert {name for name in result.faults_injected if name in RATE_NAMES} == {fault, *WITH.get(fault, {})}
    assert sum(result.outcomes.values()) == SAGAS
    assert set(result.outcomes) <= {"completed", "cancelled", "rejected"}
    if fault in EVIDENCE:
        assert result.counters[EVIDENCE[fault]] > baseline.counters[EVIDENCE[fault]]
    if fault in ("silence", "permanent_error"):
        # A silent or failing participant makes steps time out: sagas compensate.
        assert result.outcomes.get("cancelled", 0) > baseline.outcomes.get("cancelled", 0)
    if fault == "permanent_error":
        assert all(d["reason"] and d["saga_id"] for d in result.dead_letters)
