"""The payment gateway port and the deterministic gateway compensa runs by default."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

from contracts import Money, TransientError

DEFAULT_LIMIT = 500_000


@dataclass(frozen=True, slots=True)
class Authorization:
    payment_id: str


@dataclass(frozen=True, slots=True)
class Decline:
    reason: str


class PaymentGateway(Protocol):
    """What payments needs from a card processor.

    Both calls may be repeated after a crash, so an adapter must make them
    idempotent: ``authorize`` by order id, ``refund`` by payment id.
    """

    async def authorize(self, order_id: str, amount: Money, token: str) -> Authorization | Decline:
        """Authorize and capture `amount`; decline, or raise TransientError to be retried."""
        ...

    async def refund(self, payment_id: str, amount: Money) -> None:
        """Return `amount` of the payment to the customer."""
        ...


def payment_id_for(order_id: str) -> str:
    """Derive the payment id from the order id, so a retried authorize gets the same one."""
    return "pay_" + hashlib.sha1(order_id.encode(), usedforsecurity=False).hexdigest()[:16]


class RuleBasedGateway:
    """Decide by fixed rules on token and amount, so every run is reproducible.

    ``tok_decline…`` declines, ``tok_unavailable…`` fails transiently (fault
    injection), an amount over `limit` minor units declines, anything else approves.
    """

    def __init__(self, *, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit

    async def authorize(self, order_id: str, amount: Money, token: str) -> Authorization | Decline:
        if token.startswith("tok_unavailable"):
            raise TransientError("gateway unavailable")
        if token.startswith("tok_decline"):
            return Decline("card declined")
        if amount.amount > self.limit:
            return Decline("amount over limit")
        return Authorization(payment_id_for(order_id))

    async def refund(self, payment_id: str, amount: Money) -> None:
        if amount.amount <= 0:
            raise ValueError(f"refund of {amount.amount} for {payment_id}: nothing to return")
