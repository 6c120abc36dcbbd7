"""Payment rules and the rule-based gateway, without I/O."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumers.payments import RuleBasedGateway, payment_id_for, rules
from consumers.payments.gateway import Authorization, Decline
from consumers.payments.rules import Charge, ChargeStatus
from contracts import BusinessRuleError, Money, TransientError
from contracts.messages import PaymentAuthorized, PaymentDeclined, PaymentRefunded

EUR = Money(amount=1_250, currency="EUR")


def charge(status: ChargeStatus, **kwargs: object) -> Charge:
    defaults: dict[str, object] = {"payment_id": "pay_1" if status is not ChargeStatus.DECLINED else None}
    return Charge("o1", status, EUR, **(defaults | kwargs))  # type: ignore[arg-type]


async def test_the_gateway_approves_with_a_payment_id_derived_from_the_order() -> None:
    gateway = RuleBasedGateway()
    first = await gateway.authorize("o1", EUR, "tok_visa")

    assert first == await gateway.authorize("o1", EUR, "tok_other") == Authorization(payment_id_for("o1"))
    assert first != await gateway.authorize("o2", EUR, "tok_visa")
    assert payment_id_for("o1").startswith("pay_") and len(payment_id_for("o1")) == 20


async def test_the_gateway_declines_by_token_and_by_limit() -> None:
    gateway = RuleBasedGateway(limit=1_000)

    assert await gateway.authorize("o1", EUR, "tok_decline_insufficient") == Decline("card declined")
    assert await gateway.authorize("o1", EUR, "tok_visa") == Decline("amount over limit")
    assert await gateway.authorize("o1", Money(amount=1_000, currency="EUR"), "tok_visa") == Authorization(payment_id_for("o1"))
    assert await RuleBasedGateway().authorize("o1", Money(amount=500_001, currency="EUR"), "tok_visa") == Decline(
        "amount over limit"
    )


async def test_the_gateway_fails_transiently_for_an_unavailable_token() -> None:
    with pytest.raises(TransientError, match="gateway unavailable"):
        await RuleBasedGateway().authorize("o1", EUR, "tok_unavailable")


def test_the_gateway_answer_becomes_the_charge_and_its_event() -> None:
    claimed = rules.pending_charge("o1", EUR)

    approved, event = rules.charge_outcome(claimed, Authorization("pay_1"))
    assert approved == Charge("o1", ChargeStatus.AUTHORIZED, EUR, payment_id="pay_1")
    assert event == PaymentAuthorized(order_id="o1", payment_id="pay_1", amount=EUR)

    declined, event = rules.charge_outcome(claimed, Decline("card declined"))
    assert declined == Charge("o1", ChargeStatus.DECLINED, EUR, reason="card declined")
    assert event == PaymentDeclined(order_id="o1", reason="card declined")


@pytest.mark.parametrize(
    ("existing", "expected"),
    [
        (charge(ChargeStatus.AUTHORIZED), PaymentAuthorized(order_id="o1", payment_id="pay_1", amount=EUR)),
        (charge(ChargeStatus.DECLINED, reason="card declined"), PaymentDeclined(order_id="o1", reason="card declined")),
        (
            Charge("o1", ChargeStatus.VOIDED, Money(amount=0, currency="XXX")),
            PaymentDeclined(order_id="o1", reason="order voided"),
        ),
        (
            charge(ChargeStatus.REFUNDED, refunded_amount=1_250),
            PaymentDeclined(order_id="o1", reason="order already refunded"),
        ),
    ],
)
def test_a_repeated_charge_gets_the_stored_answer(existing: Charge, expected: object) -> None:
    assert rules.repeat_charge(existing, EUR) == expected


def test_a_charge_of_another_amount_for_the_same_order_is_refused() -> None:
    with pytest.raises(BusinessRuleError, match="earlier charge"):
        rules.repeat_charge(charge(ChargeStatus.AUTHORIZED), Money(amount=1, currency="EUR"))


def test_refund_returns_the_whole_charge_once() -> None:
    decision = rules.decide_refund(charge(ChargeStatus.AUTHORIZED), "o1")

    assert decision.refund == rules.GatewayRefund("pay_1", EUR)
    assert decision.charge == charge(ChargeStatus.REFUNDED, refunded_amount=1_250)
    assert decision.event == PaymentRefunded(order_id="o1", amount=EUR)

    again = rules.decide_refund(decision.charge, "o1")
    assert (again.charge, again.refund) == (None, None)
    assert again.event == PaymentRefunded(order_id="o1", amount=Money(amount=0, currency="EUR"))


def test_refund_before_any_charge_leaves_a_void_tombstone() -> None:
    decision = rules.decide_refund(None, "o1")

    nothing = Money(amount=0, currency="XXX")
    assert decision.charge == Charge("o1", ChargeStatus.VOIDED, nothing)
    assert decision.refund is None
    assert decision.event == PaymentRefunded(order_id="o1", amount=nothing)


@pytest.mark.parametrize(
    "existing",
    [
        charge(ChargeStatus.DECLINED, reason="card declined"),
        Charge("o1", ChargeStatus.VOIDED, Money(amount=0, currency="XXX")),
    ],
)
def test_nothing_is_refunded_for_an_order_never_charged(existing: Charge) -> None:
    decision = rules.decide_refund(existing, "o1")

    assert (decision.charge, decision.refund) == (None, None)
    assert isinstance(decision.event, PaymentRefunded) and decision.event.amount.amount == 0


@given(
    amount=st.integers(0, 10**9),
    status=st.sampled_from(list(ChargeStatus)),
    already=st.integers(0, 10**9),
    repeats=st.integers(1, 4),
)
def test_refunds_never_exceed_the_charge(amount: int, status: ChargeStatus, already: int, repeats: int) -> None:
    prior = min(already, amount)
    current = Charge("o1", status, Money(amount=amount, currency="EUR"), payment_id="pay_1", refunded_amount=prior)
    returned = 0
    for _ in range(repeats):
        decision = rules.decide_refund(current, "o1")
        assert isinstance(decision.event, PaymentRefunded)
        returned += decision.event.amount.amount
        if decision.refund is not None:
            assert decision.refund.amount == decision.event.amount
        current = decision.charge or current
        assert current.refunded_amount <= current.amount.amount

    if status in (ChargeStatus.AUTHORIZED, ChargeStatus.REFUNDED):
        assert prior + returned == amount
    else:
        assert returned == 0
