"""Order rules: the total of an order, and how its status follows the saga. No I/O."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from contracts import Money, OrderLine


class OrderStatus(StrEnum):
    PENDING = "pending"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class Order:
    order_id: str
    customer_id: str
    status: OrderStatus
    total: Money
    lines: tuple[OrderLine, ...]
    reason: str | None = None


def total_of(lines: Iterable[OrderLine], currency: str) -> Money:
    """Sum quantity times unit price over the lines."""
    return Money(amount=sum(line.quantity * line.unit_price for line in lines), currency=currency)


def same_order(existing: Order, requested: Order) -> bool:
    """Tell whether a placement repeats the stored order (its status aside)."""
    return (existing.customer_id, existing.total, existing.lines) == (
        requested.customer_id,
        requested.total,
        requested.lines,
    )


def next_status(current: OrderStatus, outcome: OrderStatus) -> OrderStatus | None:
    """Return the status an outcome moves the order to; None once the order is settled."""
    if current is OrderStatus.PENDING and outcome is not OrderStatus.PENDING:
        return outcome
    return None
