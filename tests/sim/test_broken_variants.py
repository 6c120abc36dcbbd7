"""Break the product on purpose, through test-only seams: the checker must say what broke."""

from __future__ import annotations

from functools import partial

from sagas.simulation.faults import FaultRates
from tests.sim.support import (
    SAGA_WITHOUT_COMPENSATIONS,
    STOCK_NEVER_RELEASED,
    InboxSwitchedOff,
    LossyPublisher,
    invariants_broken,
    ledger_trusting_the_inbox,
    simulate,
)

SAGAS = 30
REDELIVERIES = FaultRates(duplicate=0.3, lost_ack=0.2)
MANY_DECLINES = {"decline_rate": 0.5}


def test_inbox_alone_makes_a_naive_ledger_safe() -> None:
    """The control: the same naive ledger with the inbox on keeps every invariant."""
    result = simulate(sagas=SAGAS, faults=REDELIVERIES, handler_overrides=ledger_trusting_the_inbox())

    assert result.violations == []
    assert result.counters["duplicates_skipped"] > 0


def test_participants_are_idempotent_without_the_inbox() -> None:
    """Defence in depth: the production handlers dedupe by business key on their own."""
    result = simulate(sagas=SAGAS, faults=REDELIVERIES, unit_of_work=InboxSwitchedOff)

    assert result.violations == []
    assert result.counters["duplicates_skipped"] == 0


def test_inbox_switched_off_is_caught() -> None:
    result = simulate(
        sagas=SAGAS, faults=REDELIVERIES, unit_of_work=InboxSwitchedOff, handler_overrides=ledger_trusting_the_inbox()
    )

    assert {"no effect applied twice", "ledger matches payments"} <= invariants_broken(result.violations)
    twice = [v for v in result.violations if v.invariant == "no effect applied twice"]
    assert all(v.saga_id and "posted more than once" in v.detail for v in twice)


def test_stock_release_that_releases_nothing_is_caught() -> None:
    result = simulate(sagas=SAGAS, workload=MANY_DECLINES, handler_overrides=STOCK_NEVER_RELEASED)

    assert result.outcomes.get("cancelled", 0) > 0
    assert "no stock left reserved" in invariants_broken(result.violations)


def test_saga_without_compensations_is_caught() -> None:
    result = simulate(sagas=SAGAS, workload=MANY_DECLINES, orchestrator=SAGA_WITHOUT_COMPENSATIONS)

    assert result.outcomes.get("cancelled", 0) > 0
    assert "no stock left reserved" in invariants_broken(result.violations)


def test_relay_that_marks_unpublished_rows_sent_is_caught() -> None:
    lossy: list[LossyPublisher] = []

    def wrap(inner):  # type: ignore[no-untyped-def]
        lossy.append(LossyPublisher(inner))
        return lossy[-1]

    result = simulate(sagas=SAGAS, relay_publisher=wrap)

    dropped = set(lossy[0].dropped)
    assert dropped
    broken = invariants_broken(result.violations)
    assert {"every outbox row published", "every saga terminal"} <= broken
    named = {v.detail.split()[1] for v in result.violations if "marked sent, never published" in v.detail}
    assert named and named <= dropped


def test_wrappers_see_a_working_publisher() -> None:
    """The relay seam alone, passing everything through, changes nothing."""
    result = simulate(sagas=20, relay_publisher=partial(LossyPublisher, loss=0.0))

    assert result.violations == []
