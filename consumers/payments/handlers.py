"""Payment handlers: charge and refund through the gateway port, once per order."""

from __future__ import annotations

from functools import partial

from consumers.payments import rules
from consumers.payments.gateway import PaymentGateway, RuleBasedGateway
from consumers.payments.store import PaymentStore
from contracts import Message
from contracts.messages import ChargePayment, RefundPayment
from outbox.uow import Handler, UnitOfWork


async def handle_charge_payment(uow: UnitOfWork, message: Message[ChargePayment], *, gateway: PaymentGateway) -> None:
    """Charge the order once; answer a repeated charge from the stored outcome."""
    command = message.payload
    store = PaymentStore(uow.connection)
    existing = await store.charge(command.order_id)
    if existing is not None:
        uow.send(rules.repeat_charge(existing, command.amount))
        return
    # Claim the order before asking the gateway: a concurrent refund then waits for
    # this outcome instead of voiding an order the gateway has just charged.
    claimed = rules.pending_charge(command.order_id, command.amount)
    await store.insert(claimed, uow.now())
    result = await gateway.authorize(command.order_id, command.amount, command.payment_token)
    charge, event = rules.charge_outcome(claimed, result)
    await store.update(charge, expected=rules.ChargeStatus.PENDING, now=uow.now())
    uow.send(event)


async def handle_refund_payment(uow: UnitOfWork, message: Message[RefundPayment], *, gateway: PaymentGateway) -> None:
    """Return what the order was charged, once; void an order not charged yet."""
    order_id = message.payload.order_id
    store = PaymentStore(uow.connection)
    existing = await store.charge(order_id)
    decision = rules.decide_refund(existing, order_id)
    if decision.refund is not None:
        await gateway.refund(decision.refund.payment_id, decision.refund.amount)
    if decision.charge is not None:
        if existing is None:
            await store.insert(decision.charge, uow.now())
        else:
            await store.update(decision.charge, expected=existing.status, now=uow.now())
    uow.send(decision.event)


def make_handlers(gateway: PaymentGateway) -> dict[str, Handler]:
    """Return the payment handlers, bound to `gateway`, keyed by command type."""
    return {
        ChargePayment.message_type: partial(handle_charge_payment, gateway=gateway),
        RefundPayment.message_type: partial(handle_refund_payment, gateway=gateway),
    }


HANDLERS: dict[str, Handler] = make_handlers(RuleBasedGateway())
