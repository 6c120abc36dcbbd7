"""A second saga, defined only here, runs on the same engine without touching it.

Subscription: open an account (undone by closing it), then start billing (the
last step, which nothing undoes).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from pydantic import Field

from contracts.messages import Payload
from sagas import (
    Compensation,
    Deadline,
    SagaDefinition,
    SagaState,
    SagaStatus,
    Step,
    Transition,
    on_deadline,
    on_message,
    start,
)

T0 = datetime(2026, 3, 1, tzinfo=UTC)


class SubscriptionRequested(Payload):
    message_type = "subscription.requested"
    kind = "event"
    subscription_id: str
    plan: str = Field(min_length=1)


class OpenAccount(Payload):
    message_type = "account.open"
    kind = "command"
    subscription_id: str


class AccountOpened(Payload):
    message_type = "account.opened"
    kind = "event"
    subscription_id: str
    account_id: str


class AccountRefused(Payload):
    message_type = "account.refused"
    kind = "event"
    subscription_id: str
    reason: str


class CloseAccount(Payload):
    message_type = "account.close"
    kind = "command"
    subscription_id: str
    account_id: str | None  # unknown when opening timed out


class AccountClosed(Payload):
    message_type = "account.closed"
    kind = "event"
    subscription_id: str


class StartBilling(Payload):
    message_type = "billing.start"
    kind = "command"
    account_id: str
    plan: str


class BillingStarted(Payload):
    message_type = "billing.started"
    kind = "event"
    account_id: str


class BillingFailed(Payload):
    message_type = "billing.failed"
    kind = "event"
    account_id: str


class SubscriptionActivated(Payload):
    message_type = "subscription.activated"
    kind = "event"
    subscription_id: str


class SubscriptionEnded(Payload):
    message_type = "subscription.ended"
    kind = "event"
    subscription_id: str
    outcome: str
    reason: str


SUBSCRIPTION_SAGA = SagaDefinition(
    name="subscription",
    starts_with=SubscriptionRequested,
    initial_data=lambda request: request.model_dump(mode="json"),
    steps=(
        Step(
            name="account",
            command=OpenAccount,
            build=lambda data: OpenAccount(subscription_id=data["subscription_id"]),
            success=AccountOpened,
            failures=(AccountRefused,),
            deadline=timedelta(seconds=10),
            compensation=Compensation(
                command=CloseAccount,
                build=lambda data: CloseAccount(subscription_id=data["subscription_id"], account_id=data.get("account_id")),
                confirmed_by=AccountClosed,
            ),
            on_success=lambda data, opened: {**data, "account_id": opened.account_id},  # type: ignore[attr-defined]
        ),
        Step(
            name="billing",
            command=StartBilling,
            build=lambda data: StartBilling(account_id=data["account_id"], plan=data["plan"]),
            success=BillingStarted,
            failures=(BillingFailed,),
            deadline=timedelta(minutes=1),
            compensation=None,
        ),
    ),
    completed=lambda data: SubscriptionActivated(subscription_id=data["subscription_id"]),
    cancelled=lambda data, reason: SubscriptionEnded(subscription_id=data["subscription_id"], outcome="cancelled", reason=reason),
    rejected=lambda data, reason: SubscriptionEnded(subscription_id=data["subscription_id"], outcome="rejected", reason=reason),
    compensation_deadline=timedelta(minutes=5),
    max_compensation_attempts=2,
)

REQUEST = SubscriptionRequested(subscription_id="s-1", plan="gold")
OPENED = AccountOpened(subscription_id="s-1", account_id="a-1")
REFUSED = AccountRefused(subscription_id="s-1", reason="kyc")
CLOSED = AccountClosed(subscription_id="s-1")
STARTED = BillingStarted(account_id="a-1")
BILLING_FAILED = BillingFailed(account_id="a-1")


def begin(definition: SagaDefinition = SUBSCRIPTION_SAGA) -> SagaState:
    return start(definition, REQUEST, "s-1", T0).state


def apply(state: SagaState, *payloads: Payload, definition: SagaDefinition = SUBSCRIPTION_SAGA) -> Transition:
    transition = Transition(state, (), None, "", "", changed=False)
    for payload in payloads:
        transition = on_message(definition, transition.state, payload, T0)
    return transition


def test_handled_types_come_from_the_definition() -> None:
    assert SUBSCRIPTION_SAGA.handled_types() == {
        "subscription.requested",
        "account.opened",
        "account.refused",
        "account.closed",
        "billing.started",
        "billing.failed",
    }


def test_happy_path_uses_reply_data_in_later_commands() -> None:
    started = start(SUBSCRIPTION_SAGA, REQUEST, "s-1", T0)
    assert started.outgoing == (OpenAccount(subscription_id="s-1"),)
    assert started.deadline == Deadline(T0 + timedelta(seconds=10), "step", "account", 1)

    opened = on_message(SUBSCRIPTION_SAGA, started.state, OPENED, T0)
    assert opened.outgoing == (StartBilling(account_id="a-1", plan="gold"),)
    assert opened.deadline == Deadline(T0 + timedelta(minutes=1), "step", "billing", 1)

    done = on_message(SUBSCRIPTION_SAGA, opened.state, STARTED, T0)
    assert done.outgoing == (SubscriptionActivated(subscription_id="s-1"),)
    assert done.state.status is SagaStatus.COMPLETED


def test_refused_account_rejects() -> None:
    transition = apply(begin(), REFUSED)
    assert transition.outgoing == (SubscriptionEnded(subscription_id="s-1", outcome="rejected", reason="account.refused: kyc"),)


def test_billing_failure_closes_the_account_then_cancels() -> None:
    failed = apply(begin(), OPENED, BILLING_FAILED)
    assert failed.outgoing == (CloseAccount(subscription_id="s-1", account_id="a-1"),)
    assert failed.deadline == Deadline(T0 + timedelta(minutes=5), "compensation", "billing", 1)

    closed = apply(failed.state, CLOSED)
    assert closed.outgoing == (SubscriptionEnded(subscription_id="s-1", outcome="cancelled", reason="billing.failed"),)


def test_billing_deadline_undoes_only_what_can_be_undone() -> None:
    state = apply(begin(), OPENED).state
    timed_out = on_deadline(SUBSCRIPTION_SAGA, state, Deadline(T0, "step", "billing", 1), T0)
    assert timed_out.outgoing == (CloseAccount(subscription_id="s-1", account_id="a-1"),)
    assert timed_out.state.reason == "deadline: billing"


def test_late_account_opened_is_closed_with_the_id_it_carries() -> None:
    timed_out = on_deadline(SUBSCRIPTION_SAGA, begin(), Deadline(T0, "step", "account", 1), T0)
    assert timed_out.outgoing == (CloseAccount(subscription_id="s-1", account_id=None),)

    late = apply(timed_out.state, OPENED)
    assert late.outgoing == (CloseAccount(subscription_id="s-1", account_id="a-1"),)
    assert late.state.status is SagaStatus.COMPENSATING


def test_a_late_success_of_a_step_without_compensation_is_ignored() -> None:
    state = apply(begin(), OPENED).state
    state = on_deadline(SUBSCRIPTION_SAGA, state, Deadline(T0, "step", "billing", 1), T0).state
    cancelled = apply(state, CLOSED).state
    assert cancelled.status is SagaStatus.CANCELLED

    late = apply(cancelled, STARTED)

    assert not late.changed
    assert late.note == "late billing.started: billing has nothing to undo"


def test_its_own_compensation_budget_applies() -> None:
    state = apply(begin(), OPENED, BILLING_FAILED).state
    resent = on_deadline(SUBSCRIPTION_SAGA, state, Deadline(T0, "compensation", "billing", 1), T0)
    assert resent.outgoing == (CloseAccount(subscription_id="s-1", account_id="a-1"),)
    failed = on_deadline(SUBSCRIPTION_SAGA, resent.state, Deadline(T0, "compensation", "billing", 2), T0)
    assert failed.state.status is SagaStatus.COMPENSATION_FAILED


def test_failure_after_steps_with_nothing_to_undo_cancels_directly() -> None:
    no_undo = replace(
        SUBSCRIPTION_SAGA,
        steps=(replace(SUBSCRIPTION_SAGA.steps[0], compensation=None), SUBSCRIPTION_SAGA.steps[1]),
    )
    transition = apply(begin(no_undo), OPENED, BILLING_FAILED, definition=no_undo)

    assert transition.outgoing == (SubscriptionEnded(subscription_id="s-1", outcome="cancelled", reason="billing.failed"),)
    assert transition.state.status is SagaStatus.CANCELLED
    assert transition.deadline is None
    assert transition.note == "billing failed, nothing to undo -> cancelled"


def test_a_timeout_with_nothing_to_undo_cancels_directly() -> None:
    no_undo = replace(SUBSCRIPTION_SAGA, steps=(replace(SUBSCRIPTION_SAGA.steps[0], compensation=None),))
    transition = on_deadline(no_undo, begin(no_undo), Deadline(T0, "step", "account", 1), T0)
    assert transition.state.status is SagaStatus.CANCELLED
    assert transition.outgoing[0].model_dump()["reason"] == "deadline: account"
