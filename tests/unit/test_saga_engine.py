"""The transition engine driven through the order saga: every path of the machine."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from contracts.messages import (
    ChargePayment,
    LedgerUpdated,
    Money,
    OrderCreated,
    OrderLine,
    Payload,
    PaymentAuthorized,
    PaymentDeclined,
    PaymentRefunded,
    Posting,
    ReserveStock,
    StockCommitFailed,
    StockCommitted,
    StockLine,
    StockReleased,
    StockReservationFailed,
    StockReserved,
)
from sagas import (
    ORDER_SAGA,
    Deadline,
    SagaStatus,
    Transition,
    cancel,
    on_deadline,
    on_message,
    retry_compensation,
    start,
)

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
ORDER_ID = "o-1"

ORDER = OrderCreated(
    order_id=ORDER_ID,
    customer_id="c-1",
    lines=(
        OrderLine(sku="apple", quantity=2, unit_price=150),
        OrderLine(sku="pear", quantity=1, unit_price=200),
    ),
    total=Money(amount=500, currency="EUR"),
    payment_token="tok_ok",
)

REPLIES: dict[str, Payload] = {
    p.message_type: p
    for p in (
        StockReserved(order_id=ORDER_ID, lines=(StockLine(sku="apple", quantity=2),)),
        StockReservationFailed(order_id=ORDER_ID, reason="out of stock"),
        PaymentAuthorized(order_id=ORDER_ID, payment_id="pay-1", amount=Money(amount=500, currency="EUR")),
        PaymentDeclined(order_id=ORDER_ID, reason="insufficient funds"),
        StockCommitted(order_id=ORDER_ID),
        StockCommitFailed(order_id=ORDER_ID, reason="reservation expired"),
        StockReleased(order_id=ORDER_ID),
        PaymentRefunded(order_id=ORDER_ID, amount=Money(amount=500, currency="EUR")),
        ORDER,
        LedgerUpdated(
            order_id=ORDER_ID,
            transaction_id="t-1",
            postings=(
                Posting(account="cash", debit=500, credit=0),
                Posting(account="sales", debit=0, credit=500),
            ),
            balances={"cash": 500},
        ),
    )
}


def types(transition: Transition) -> tuple[str, ...]:
    return tuple(p.message_type for p in transition.outgoing)


class Run:
    """Drive one saga, keeping its state and its active deadline like an orchestrator."""

    def __init__(self) -> None:
        self.now = T0
        self.last = start(ORDER_SAGA, ORDER, ORDER_ID, self.now)
        self.state = self.last.state
        self.deadline = self.last.deadline

    def _apply(self, transition: Transition) -> Transition:
        self.last = transition
        if transition.changed:
            self.state = transition.state
            self.deadline = transition.deadline
        return transition

    def reply(self, message_type: str) -> Transition:
        self.now += timedelta(seconds=1)
        return self._apply(on_message(ORDER_SAGA, self.state, REPLIES[message_type], self.now))

    def fire(self, deadline: Deadline | None = None) -> Transition:
        deadline = deadline or self.deadline
        assert deadline is not None
        self.now = max(self.now, deadline.due_at)
        return self._apply(on_deadline(ORDER_SAGA, self.state, deadline, self.now))

    def retry(self) -> Transition:
        return self._apply(retry_compensation(ORDER_SAGA, self.state, self.now))

    def cancel(self, reason: str = "customer called") -> Transition:
        self.now += timedelta(seconds=1)
        return self._apply(cancel(ORDER_SAGA, self.state, self.now, reason))


def run(*steps: str) -> Run:
    """A saga after these replies ("deadline" fires the active deadline)."""
    saga = Run()
    for step in steps:
        if step == "deadline":
            saga.fire()
        else:
            saga.reply(step)
    return saga


# ---------------------------------------------------------------- start and happy path


def test_start_reserves_stock_with_a_step_deadline() -> None:
    transition = start(ORDER_SAGA, ORDER, ORDER_ID, T0)

    assert transition.changed
    assert transition.trigger == "order.created"
    assert transition.outgoing == (
        ReserveStock(
            order_id=ORDER_ID,
            lines=(StockLine(sku="apple", quantity=2), StockLine(sku="pear", quantity=1)),
        ),
    )
    assert transition.deadline == Deadline(due_at=T0 + timedelta(seconds=30), kind="step", step="reserve", attempt=1)
    state = transition.state
    assert (state.saga_id, state.definition, state.status, state.step) == (
        ORDER_ID,
        "order",
        SagaStatus.RUNNING,
        0,
    )
    assert (state.version, state.started_at, state.updated_at) == (1, T0, T0)
    assert state.done_steps == state.pending_compensations == ()
    assert state.reason is None


def test_start_refuses_a_message_that_does_not_start_the_saga() -> None:
    with pytest.raises(ValueError, match=r"starts with order\.created"):
        start(ORDER_SAGA, REPLIES["stock.reserved"], ORDER_ID, T0)


def test_happy_path_reserve_charge_commit_complete() -> None:
    saga = Run()

    reserved = saga.reply("stock.reserved")
    assert reserved.outgoing == (
        ChargePayment(order_id=ORDER_ID, amount=Money(amount=500, currency="EUR"), payment_token="tok_ok"),
    )
    assert reserved.deadline is not None and (reserved.deadline.kind, reserved.deadline.step) == (
        "step",
        "charge",
    )
    assert reserved.note == "reserve succeeded -> charge"

    authorized = saga.reply("payment.authorized")
    assert types(authorized) == ("stock.commit",)
    assert authorized.state.data["payment_id"] == "pay-1"

    committed = saga.reply("stock.committed")
    assert types(committed) == ("order.completed",)
    assert committed.outgoing[0].model_dump() == {
        "order_id": ORDER_ID,
        "total": {"amount": 500, "currency": "EUR"},
    }
    assert committed.deadline is None
    assert committed.state.status is SagaStatus.COMPLETED
    assert committed.state.done_steps == ("reserve", "charge", "commit")
    assert committed.state.is_terminal


def test_every_applied_transition_bumps_the_version_and_stamps_now() -> None:
    saga = Run()
    versions = [saga.state.version]
    for reply in ("stock.reserved", "stock.reserved", "payment.authorized", "stock.committed"):
        transition = saga.reply(reply)
        versions.append(saga.state.version)
        if transition.changed:
            assert transition.state.updated_at == saga.now
    assert versions == [1, 2, 2, 3, 4]
    assert saga.state.started_at == T0


def test_an_ignored_message_returns_the_state_untouched() -> None:
    saga = run("stock.reserved")
    before = saga.state

    transition = saga.reply("stock.reserved")

    assert not transition.changed
    assert transition.state is before
    assert transition.outgoing == ()
    assert "duplicate" in transition.note


def test_a_state_of_another_saga_definition_is_refused() -> None:
    state = replace(Run().state, definition="subscription")
    with pytest.raises(ValueError, match="is a subscription"):
        on_message(ORDER_SAGA, state, REPLIES["stock.reserved"], T0)


# ---------------------------------------------------------------- failures


def test_reservation_failed_rejects_without_any_command() -> None:
    transition = run().reply("stock.reservation_failed")

    assert types(transition) == ("order.rejected",)
    assert transition.outgoing[0].model_dump() == {
        "order_id": ORDER_ID,
        "reason": "stock.reservation_failed: out of stock",
    }
    assert transition.deadline is None
    assert transition.state.status is SagaStatus.REJECTED
    assert transition.state.reason == "stock.reservation_failed: out of stock"


def test_declined_payment_releases_stock_then_cancels() -> None:
    saga = run("stock.reserved")

    declined = saga.reply("payment.declined")
    assert types(declined) == ("stock.release",)
    assert declined.state.status is SagaStatus.COMPENSATING
    assert declined.state.pending_compensations == ("stock.release",)
    assert declined.deadline == Deadline(due_at=saga.now + timedelta(seconds=30), kind="compensation", step="charge", attempt=1)
    assert declined.note == "charge failed -> compensating: stock.release"

    released = saga.reply("stock.released")
    assert types(released) == ("order.cancelled",)
    assert released.outgoing[0].model_dump() == {
        "order_id": ORDER_ID,
        "reason": "payment.declined: insufficient funds",
    }
    assert released.state.status is SagaStatus.CANCELLED
    assert released.state.pending_compensations == ()
    assert released.deadline is None


def test_commit_failed_refunds_and_releases_and_cancels_only_when_both_confirm() -> None:
    saga = run("stock.reserved", "payment.authorized")

    failed = saga.reply("stock.commit_failed")
    assert types(failed) == ("payment.refund", "stock.release")
    assert failed.state.pending_compensations == ("payment.refund", "stock.release")

    refunded = saga.reply("payment.refunded")
    assert refunded.changed and refunded.outgoing == ()
    assert refunded.state.status is SagaStatus.COMPENSATING
    assert refunded.state.pending_compensations == ("stock.release",)
    # Progress re-arms the compensation timer, same attempt.
    assert refunded.deadline == Deadline(due_at=saga.now + timedelta(seconds=30), kind="compensation", step="commit", attempt=1)

    released = saga.reply("stock.released")
    assert types(released) == ("order.cancelled",)
    assert released.state.status is SagaStatus.CANCELLED


def test_confirmations_may_arrive_in_any_order() -> None:
    saga = run("stock.reserved", "payment.authorized", "stock.commit_failed", "stock.released")
    assert saga.state.pending_compensations == ("payment.refund",)
    assert types(saga.reply("payment.refunded")) == ("order.cancelled",)


# ---------------------------------------------------------------- step deadlines


@pytest.mark.parametrize(
    ("replies", "step", "compensations"),
    [
        ((), "reserve", ("stock.release",)),
        (("stock.reserved",), "charge", ("payment.refund", "stock.release")),
        # Commit and reserve both undo with stock.release: sent once.
        (("stock.reserved", "payment.authorized"), "commit", ("stock.release", "payment.refund")),
    ],
)
def test_a_step_deadline_compensates_done_steps_and_the_timed_out_step(
    replies: tuple[str, ...], step: str, compensations: tuple[str, ...]
) -> None:
    saga = run(*replies)

    transition = saga.fire()

    assert transition.trigger == f"deadline:step:{step}"
    assert types(transition) == compensations
    assert transition.state.status is SagaStatus.COMPENSATING
    assert transition.state.pending_compensations == compensations
    assert transition.state.reason == f"deadline: {step}"
    assert transition.deadline is not None
    assert (transition.deadline.kind, transition.deadline.step, transition.deadline.attempt) == (
        "compensation",
        step,
        1,
    )


def test_a_timed_out_reservation_is_cancelled_once_the_release_is_confirmed() -> None:
    saga = run("deadline")
    released = saga.reply("stock.released")
    assert types(released) == ("order.cancelled",)
    assert released.outgoing[0].model_dump()["reason"] == "deadline: reserve"


@pytest.mark.parametrize(
    ("replies", "deadline"),
    [
        # A step deadline for a step that already succeeded.
        (("stock.reserved",), Deadline(T0, "step", "reserve", 1)),
        # A step deadline for a step not yet started.
        ((), Deadline(T0, "step", "charge", 1)),
        ((), Deadline(T0, "step", "reserve", 2)),
        (("stock.reserved", "payment.authorized", "stock.committed"), Deadline(T0, "step", "commit", 1)),
        (("stock.reservation_failed",), Deadline(T0, "step", "reserve", 1)),
        # The step deadline after compensation began.
        (("stock.reserved", "payment.declined"), Deadline(T0, "step", "charge", 1)),
        # A compensation deadline of an earlier attempt, another step, or a finished saga.
        (("stock.reserved", "payment.declined", "deadline"), Deadline(T0, "compensation", "charge", 1)),
        (("stock.reserved", "payment.declined"), Deadline(T0, "compensation", "reserve", 1)),
        (
            ("stock.reserved", "payment.declined", "stock.released"),
            Deadline(T0, "compensation", "charge", 1),
        ),
        # A compensation deadline while still running.
        (("stock.reserved",), Deadline(T0, "compensation", "charge", 1)),
    ],
)
def test_stale_deadlines_are_ignored(replies: tuple[str, ...], deadline: Deadline) -> None:
    saga = run(*replies)
    before = saga.state

    transition = on_deadline(ORDER_SAGA, before, deadline, saga.now)

    assert not transition.changed
    assert transition.state is before
    assert transition.outgoing == ()
    assert transition.note.startswith("stale deadline")


# ---------------------------------------------------------------- compensation retries


def test_compensation_deadlines_resend_until_the_last_attempt_then_fail() -> None:
    saga = run("stock.reserved", "payment.authorized", "stock.commit_failed")
    sends = 1

    for attempt in range(2, ORDER_SAGA.max_compensation_attempts + 1):
        resent = saga.fire()
        sends += 1
        assert types(resent) == ("payment.refund", "stock.release")
        assert resent.state.compensation_attempts == attempt
        assert resent.deadline is not None and resent.deadline.attempt == attempt
        assert resent.state.status is SagaStatus.COMPENSATING

    failed = saga.fire()
    assert sends == ORDER_SAGA.max_compensation_attempts
    assert failed.outgoing == ()
    assert failed.deadline is None
    assert failed.state.status is SagaStatus.COMPENSATION_FAILED
    assert failed.state.pending_compensations == ("payment.refund", "stock.release")
    assert failed.state.is_terminal


def test_a_resend_covers_only_the_compensations_still_unconfirmed() -> None:
    saga = run("stock.reserved", "payment.authorized", "stock.commit_failed", "payment.refunded")
    assert types(saga.fire()) == ("stock.release",)


def exhausted(*replies: str) -> Run:
    saga = run(*replies)
    while saga.state.status is SagaStatus.COMPENSATING:
        saga.fire()
    assert saga.state.status is SagaStatus.COMPENSATION_FAILED
    return saga


def test_retry_compensation_resends_pending_with_a_fresh_budget() -> None:
    saga = exhausted("stock.reserved", "payment.authorized", "stock.commit_failed", "payment.refunded")

    retried = saga.retry()

    assert retried.trigger == "operator:retry_compensation"
    assert types(retried) == ("stock.release",)
    assert retried.state.status is SagaStatus.COMPENSATING
    assert retried.state.compensation_attempts == 1
    assert retried.deadline == Deadline(saga.now + timedelta(seconds=30), "compensation", "commit", 1)
    assert types(saga.reply("stock.released")) == ("order.cancelled",)


def test_retry_compensation_gets_a_full_new_budget() -> None:
    saga = exhausted("stock.reserved", "payment.declined")
    saga.retry()
    resends = 0
    while saga.fire().outgoing:
        resends += 1
    assert resends == ORDER_SAGA.max_compensation_attempts - 1
    assert saga.state.status is SagaStatus.COMPENSATION_FAILED


@pytest.mark.parametrize(
    "replies",
    [(), ("stock.reserved",), ("stock.reservation_failed",), ("stock.reserved", "payment.declined")],
)
def test_retry_compensation_ignores_sagas_that_did_not_fail_compensation(
    replies: tuple[str, ...],
) -> None:
    saga = run(*replies)
    transition = retry_compensation(ORDER_SAGA, saga.state, saga.now)
    assert not transition.changed
    assert transition.state is saga.state


def test_retry_with_nothing_pending_cancels() -> None:
    state = replace(exhausted("stock.reserved", "payment.declined").state, pending_compensations=())
    transition = retry_compensation(ORDER_SAGA, state, T0)
    assert types(transition) == ("order.cancelled",)
    assert transition.state.status is SagaStatus.CANCELLED


def test_a_slow_confirmation_heals_a_compensation_failed_saga() -> None:
    saga = exhausted("stock.reserved", "payment.authorized", "stock.commit_failed")

    refunded = saga.reply("payment.refunded")
    assert refunded.changed and refunded.outgoing == () and refunded.deadline is None
    assert refunded.state.status is SagaStatus.COMPENSATION_FAILED

    released = saga.reply("stock.released")
    assert types(released) == ("order.cancelled",)
    assert released.state.status is SagaStatus.CANCELLED


# ---------------------------------------------------------------- every message in every state

R = SagaStatus.RUNNING
C = SagaStatus.COMPENSATING
F = SagaStatus.COMPENSATION_FAILED
X = SagaStatus.CANCELLED
J = SagaStatus.REJECTED
D = SagaStatus.COMPLETED

STATES: dict[str, Callable[[], Run]] = {
    "running:reserve": lambda: run(),
    "running:charge": lambda: run("stock.reserved"),
    "running:commit": lambda: run("stock.reserved", "payment.authorized"),
    "compensating:declined": lambda: run("stock.reserved", "payment.declined"),
    "compensating:charge_deadline": lambda: run("stock.reserved", "deadline"),
    "compensating:commit_failed": lambda: run("stock.reserved", "payment.authorized", "stock.commit_failed"),
    "compensation_failed": lambda: exhausted("stock.reserved", "payment.declined"),
    "cancelled:declined": lambda: run("stock.reserved", "payment.declined", "stock.released"),
    "cancelled:charge_deadline": lambda: run("stock.reserved", "deadline", "payment.refunded", "stock.released"),
    "rejected": lambda: run("stock.reservation_failed"),
    "completed": lambda: run("stock.reserved", "payment.authorized", "stock.committed"),
}

MESSAGES = (
    "stock.reserved",
    "stock.reservation_failed",
    "payment.authorized",
    "payment.declined",
    "stock.committed",
    "stock.commit_failed",
    "stock.released",
    "payment.refunded",
    "order.created",
    "ledger.updated",
)

# Per state, the messages that change something: (outgoing types, status after).
# Every other message in MESSAGES must be ignored in that state.
Effect = tuple[tuple[str, ...], SagaStatus]
EXPECTED: dict[str, dict[str, Effect]] = {
    "running:reserve": {
        "stock.reserved": (("payment.charge",), R),
        "stock.reservation_failed": (("order.rejected",), J),
    },
    "running:charge": {
        "payment.authorized": (("stock.commit",), R),
        "payment.declined": (("stock.release",), C),
    },
    "running:commit": {
        "stock.committed": (("order.completed",), D),
        "stock.commit_failed": (("payment.refund", "stock.release"), C),
    },
    # Contradictory late successes (authorized after declined) are still undone.
    "compensating:declined": {
        "payment.authorized": (("payment.refund",), C),
        "stock.committed": (("stock.release",), C),
        "stock.released": (("order.cancelled",), X),
    },
    "compensating:charge_deadline": {
        "payment.authorized": (("payment.refund",), C),
        "stock.committed": (("stock.release",), C),
        "stock.released": ((), C),
        "payment.refunded": ((), C),
    },
    "compensating:commit_failed": {
        "stock.committed": (("stock.release",), C),
        "stock.released": ((), C),
        "payment.refunded": ((), C),
    },
    "compensation_failed": {
        "payment.authorized": (("payment.refund",), F),
        "stock.committed": (("stock.release",), F),
        "stock.released": (("order.cancelled",), X),
    },
    "cancelled:declined": {
        "payment.authorized": (("payment.refund",), X),
        "stock.committed": (("stock.release",), X),
    },
    "cancelled:charge_deadline": {
        "payment.authorized": (("payment.refund",), X),
        "stock.committed": (("stock.release",), X),
    },
    "rejected": {
        "stock.reserved": (("stock.release",), J),
        "payment.authorized": (("payment.refund",), J),
        "stock.committed": (("stock.release",), J),
    },
    "completed": {},
}

CASES = [
    pytest.param(state, message, effects.get(message), id=f"{state}-{message}")
    for state, effects in EXPECTED.items()
    for message in MESSAGES
]
SUCCESSES = ("stock.reserved", "payment.authorized", "stock.committed")
LATE_SUCCESSES = [
    pytest.param(state, message, id=f"{state}-{message}")
    for state, effects in EXPECTED.items()
    for message in effects
    if not state.startswith("running") and message in SUCCESSES
]


def test_the_expectation_table_names_only_known_messages() -> None:
    assert {m for effects in EXPECTED.values() for m in effects} <= set(MESSAGES)


@pytest.mark.parametrize(("state_name", "message", "expected"), CASES)
def test_every_message_in_every_state(state_name: str, message: str, expected: Effect | None) -> None:
    saga = STATES[state_name]()
    before = saga.state

    transition = saga.reply(message)

    if expected is None:
        assert not transition.changed, transition.note
        assert transition.state is before
        assert transition.outgoing == ()
        return
    outgoing, status = expected
    assert transition.changed
    assert types(transition) == outgoing
    assert transition.state.status is status
    assert transition.state.version == before.version + 1
    if status is SagaStatus.COMPENSATING:
        assert transition.deadline is not None and transition.deadline.kind == "compensation"
    if status in (X, J, D, F):
        assert transition.deadline is None


@pytest.mark.parametrize(("state_name", "message"), LATE_SUCCESSES)
def test_a_late_success_is_undone_once(state_name: str, message: str) -> None:
    saga = STATES[state_name]()
    status = saga.state.status

    first = saga.reply(message)
    again = saga.reply(message)

    assert first.note.startswith(f"late {message} while {status} -> ")
    assert not again.changed
    assert again.state is first.state


@pytest.mark.parametrize("state_name", ["cancelled:declined", "rejected", "compensation_failed"])
def test_a_late_success_on_a_finished_saga_sets_no_deadline(state_name: str) -> None:
    saga = STATES[state_name]()
    assert saga.reply("payment.authorized").deadline is None


def test_late_authorization_after_cancel_refunds() -> None:
    saga = STATES["cancelled:declined"]()

    transition = saga.reply("payment.authorized")

    assert transition.note == "late payment.authorized while cancelled -> payment.refund"
    assert transition.state.status is SagaStatus.CANCELLED
    assert transition.state.pending_compensations == ()
    # The refund's confirmation then comes back and is ignored gracefully.
    assert not saga.reply("payment.refunded").changed


def test_a_late_success_while_compensating_is_waited_for() -> None:
    saga = STATES["compensating:declined"]()

    late = saga.reply("payment.authorized")
    assert late.state.pending_compensations == ("stock.release", "payment.refund")
    assert late.state.data["payment_id"] == "pay-1"

    assert saga.reply("stock.released").state.status is SagaStatus.COMPENSATING
    assert types(saga.reply("payment.refunded")) == ("order.cancelled",)


def test_a_late_success_of_the_timed_out_step_is_refunded_again() -> None:
    # The first refund may have reached payments before the charge itself did.
    saga = STATES["compensating:charge_deadline"]()

    late = saga.reply("payment.authorized")

    assert types(late) == ("payment.refund",)
    assert late.state.pending_compensations == ("payment.refund", "stock.release")
    assert late.state.done_steps == ("reserve", "charge")


def test_a_completed_saga_never_compensates() -> None:
    saga = STATES["completed"]()
    for message in MESSAGES:
        assert not saga.reply(message).changed
    for deadline in (Deadline(T0, "step", "commit", 1), Deadline(T0, "compensation", "commit", 1)):
        assert not saga.fire(deadline).changed


# ---------------------------------------------------------------- operator cancel


def test_cancel_while_reserving_releases_then_cancels() -> None:
    saga = run()

    cancelled = saga.cancel()

    assert cancelled.trigger == "operator:cancel"
    assert types(cancelled) == ("stock.release",)
    assert cancelled.state.status is SagaStatus.COMPENSATING
    assert cancelled.state.reason == "cancelled by operator: customer called"
    assert cancelled.deadline == Deadline(saga.now + timedelta(seconds=30), "compensation", "reserve", 1)
    # The release is confirmed: the order is cancelled with the operator's reason.
    assert types(saga.reply("stock.released")) == ("order.cancelled",)
    assert saga.state.status is SagaStatus.CANCELLED


def test_cancel_while_charging_voids_the_charge_and_releases_the_stock() -> None:
    saga = run("stock.reserved")

    cancelled = saga.cancel()

    assert types(cancelled) == ("payment.refund", "stock.release")
    assert cancelled.state.pending_compensations == ("payment.refund", "stock.release")
    # A charge that was captured after all is refunded, never kept.
    late = saga.reply("payment.authorized")
    assert "payment.refund" in types(late)
    saga.reply("payment.refunded")
    assert types(saga.reply("stock.released")) == ("order.cancelled",)
    assert saga.state.reason == "cancelled by operator: customer called"


@pytest.mark.parametrize(
    "replies",
    [
        ("stock.reservation_failed",),  # rejected
        ("stock.reserved", "payment.declined"),  # compensating
        ("stock.reserved", "payment.declined", "stock.released"),  # cancelled
        ("stock.reserved", "payment.authorized", "stock.committed"),  # completed
    ],
)
def test_only_a_running_saga_can_be_cancelled(replies: tuple[str, ...]) -> None:
    saga = run(*replies)
    before = saga.state

    transition = saga.cancel()

    assert not transition.changed and transition.state is before
    assert "only a running saga can be cancelled" in transition.note
