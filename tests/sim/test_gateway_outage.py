"""Gateway outages in the simulator: the payment breaker opens and closes, on virtual time, and every invariant holds."""

from __future__ import annotations

from itertools import pairwise

import pytest

from infra.simulation.driver import SimulationResult
from sagas.simulation.faults import FaultRates, profile
from sagas.simulation.report import dumps, html_page, terminal_summary, to_document, without_wall
from tests.sim.support import simulate

SAGAS = 60
OUTAGES = FaultRates(gateway_outage=0.05)


@pytest.fixture(scope="module")
def outages() -> SimulationResult:
    return simulate(seed=1, sagas=SAGAS, faults=OUTAGES)


def test_outages_open_the_breaker_and_recovery_closes_it(outages: SimulationResult) -> None:
    assert outages.violations == []
    assert sum(outages.outcomes.values()) == SAGAS
    assert outages.faults_injected["gateway_outage"] > 0
    breaker = outages.breakers["payment_gateway"]
    assert breaker["opened"] >= 1 and breaker["closed"] >= 1
    assert breaker["first_opened_at_seconds"] > 0
    # Fail fast: calls refused while open never reached the gateway.
    assert breaker["refused_calls"] > 0
    assert breaker["gateway_failures"] < breaker["gateway_calls"]
    assert outages.counters["retried"] > 0


def test_the_transitions_follow_the_state_machine(outages: SimulationResult) -> None:
    transitions = outages.breakers["payment_gateway"]["transitions"]
    assert transitions[0]["from"] == "closed" and transitions[0]["to"] == "open"
    allowed = {("closed", "open"), ("open", "half_open"), ("half_open", "open"), ("half_open", "closed")}
    for before, after in pairwise(transitions):
        assert before["to"] == after["from"]
        assert before["at_seconds"] <= after["at_seconds"]
    assert {(t["from"], t["to"]) for t in transitions} <= allowed
    for opened, half in pairwise(transitions):
        if opened["to"] == "open":
            # The default cool-down (5 s of virtual time) before a probe.
            assert half["at_seconds"] - opened["at_seconds"] >= 5.0


def test_the_report_shows_the_breaker(outages: SimulationResult) -> None:
    document = to_document(outages)
    breaker = document["circuit_breakers"]["payment_gateway"]

    summary = terminal_summary(document)
    assert f"circuit breaker: payment_gateway opened {breaker['opened']}, " in summary
    assert f"closed {breaker['closed']} (first opened at {breaker['first_opened_at_seconds']:.3f} s)" in summary
    page = html_page(document, list(outages.durations.values()))
    assert "Circuit breaker: payment_gateway" in page and "probe succeeded" in page


def test_a_seed_replays_the_same_outages_and_transitions(outages: SimulationResult) -> None:
    again = simulate(seed=1, sagas=SAGAS, faults=OUTAGES)

    assert dumps(without_wall(to_document(again))) == dumps(without_wall(to_document(outages)))


def test_without_outages_the_breaker_stays_closed() -> None:
    result = simulate(seed=1, sagas=20)

    breaker = result.breakers["payment_gateway"]
    assert (breaker["opened"], breaker["refused_calls"], breaker["transitions"]) == (0, 0, [])
    assert breaker["gateway_calls"] >= 20 - result.outcomes.get("rejected", 0)
    assert "circuit breaker: payment_gateway never opened" in terminal_summary(to_document(result))


def test_the_chaos_profile_includes_outages() -> None:
    assert profile("chaos").gateway_outage > 0
    assert profile("default").gateway_outage == 0
