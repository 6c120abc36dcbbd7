"""Payments: one charge per order through the gateway port, refunded at most once."""

from consumers.payments.gateway import (
    Authorization,
    Decline,
    PaymentGateway,
    RuleBasedGateway,
    payment_id_for,
)
from consumers.payments.handlers import (
    HANDLERS,
    handle_charge_payment,
    handle_refund_payment,
    make_handlers,
)
from consumers.payments.store import charges, net_captured
from consumers.payments.tables import SERVICE, payments_charges

__all__ = [
    "HANDLERS",
    "SERVICE",
    "Authorization",
    "Decline",
    "PaymentGateway",
    "RuleBasedGateway",
    "charges",
    "handle_charge_payment",
    "handle_refund_payment",
    "make_handlers",
    "net_captured",
    "payment_id_for",
    "payments_charges",
]
