"""Payment rules: one charge per order, refunded at most once and never beyond it. No I/O."""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from consumers.payments.gateway import Authorization, Decline
from contracts import BusinessRuleError, Money, Payload
from contracts.messages import PaymentAuthorized, PaymentDeclined, PaymentRefunded

#: ISO 4217 "no currency": the amount of a refund for an order never charged.
NO_CURRENCY = "XXX"


class ChargeStatus(StrEnum):
    #: Claimed while the gateway is asked; never committed in this state.
    PENDING = "pending"
    AUTHORIZED = "authorized"
    DECLINED = "declined"
    REFUNDED = "refunded"
    #: Refund arrived before any charge: a tombstone that declines a late charge.
    VOIDED = "voided"


@dataclass(frozen=True, slots=True)
class Charge:
    order_id: str
    status: ChargeStatus
    amount: Money
    payment_id: str | None = None
    refunded_amount: int = 0
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class GatewayRefund:
    payment_id: str
    amount: Money


@dataclass(frozen=True, slots=True)
class RefundDecision:
    """The charge to store (None: unchanged), what to return through the gateway, the event."""

    charge: Charge | None
    refund: GatewayRefund | None
    event: Payload


def pending_charge(order_id: str, amount: Money) -> Charge:
    return Charge(order_id, ChargeStatus.PENDING, amount)


def repeat_charge(existing: Charge, amount: Money) -> Payload:
    """Answer a charge for an order already seen, from what happened to it."""
    order_id = existing.order_id
    if existing.status is ChargeStatus.VOIDED:
        return PaymentDeclined(order_id=order_id, reason="order voided")
    if existing.status is ChargeStatus.REFUNDED:
        return PaymentDeclined(order_id=order_id, reason="order already refunded")
    if existing.amount != amount:
        raise BusinessRuleError(
            f"payment.charge for order {order_id} asks {amount.amount} {amount.currency}, "
            f"earlier charge was {existing.amount.amount} {existing.amount.currency}"
        )
    if existing.status is ChargeStatus.AUTHORIZED:
        assert existing.payment_id is not None
        return PaymentAuthorized(order_id=order_id, payment_id=existing.payment_id, amount=existing.amount)
    if existing.status is ChargeStatus.DECLINED:
        return PaymentDeclined(order_id=order_id, reason=existing.reason or "declined")
    raise ValueError(f"charge of order {order_id} is {existing.status}, which is never committed")


def charge_outcome(claimed: Charge, result: Authorization | Decline) -> tuple[Charge, Payload]:
    """Turn the gateway's answer into the charge to store and the event to send."""
    order_id = claimed.order_id
    if isinstance(result, Authorization):
        charge = replace(claimed, status=ChargeStatus.AUTHORIZED, payment_id=result.payment_id)
        return charge, PaymentAuthorized(order_id=order_id, payment_id=result.payment_id, amount=claimed.amount)
    charge = replace(claimed, status=ChargeStatus.DECLINED, reason=result.reason)
    return charge, PaymentDeclined(order_id=order_id, reason=result.reason)


def refundable(charge: Charge) -> int:
    """Return what may still be returned: the charge less what was refunded already."""
    if charge.status not in (ChargeStatus.AUTHORIZED, ChargeStatus.REFUNDED):
        return 0
    return max(0, charge.amount.amount - charge.refunded_amount)


def decide_refund(existing: Charge | None, order_id: str) -> RefundDecision:
    """Return the whole remaining charge once; void an order not charged yet."""
    if existing is None:
        nothing = Money(amount=0, currency=NO_CURRENCY)
        tombstone = Charge(order_id, ChargeStatus.VOIDED, nothing)
        return RefundDecision(tombstone, None, PaymentRefunded(order_id=order_id, amount=nothing))
    currency = existing.amount.currency
    due = refundable(existing)
    if due == 0:
        return RefundDecision(None, None, PaymentRefunded(order_id=order_id, amount=Money(amount=0, currency=currency)))
    assert existing.payment_id is not None, "a captured charge always has a payment id"
    refund = Money(amount=due, currency=currency)
    charge = replace(existing, status=ChargeStatus.REFUNDED, refunded_amount=existing.refunded_amount + due)
    return RefundDecision(charge, GatewayRefund(existing.payment_id, refund), PaymentRefunded(order_id=order_id, amount=refund))
