"""Payload models of every event and command in the catalogue.

Events are past tense, commands imperative. Money is always integer minor units
plus an ISO 4217 currency. No card number or secret travels: payments carry a token.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

OrderId = str


class Payload(BaseModel):
    """Base of every message payload; subclasses name their type and version."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    message_type: ClassVar[str]
    message_version: ClassVar[int] = 1
    kind: ClassVar[Literal["event", "command"]]


class Money(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    amount: int = Field(ge=0, description="Amount in minor units (cents).")
    currency: str = Field(pattern=r"^[A-Z]{3}$", description="ISO 4217 code.")


class StockLine(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    sku: str = Field(min_length=1, max_length=64)
    quantity: int = Field(gt=0, le=1_000_000)


class OrderLine(StockLine):
    unit_price: int = Field(ge=0, description="Unit price in minor units.")


class Posting(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    account: str
    debit: int = Field(ge=0)
    credit: int = Field(ge=0)


def _order_id_field() -> object:
    return Field(min_length=1, max_length=64)


# ---------------------------------------------------------------- events


class OrderCreated(Payload):
    message_type = "order.created"
    kind = "event"

    order_id: OrderId = _order_id_field()
    customer_id: str = Field(min_length=1, max_length=64)
    lines: tuple[OrderLine, ...] = Field(min_length=1, max_length=100)
    total: Money
    payment_token: str = Field(min_length=1, max_length=128)

    @model_validator(mode="after")
    def _total_matches_lines(self) -> OrderCreated:
        expected = sum(line.quantity * line.unit_price for line in self.lines)
        if expected != self.total.amount:
            raise ValueError(f"total.amount {self.total.amount} != sum of lines {expected}")
        return self


class StockReserved(Payload):
    message_type = "stock.reserved"
    kind = "event"

    order_id: OrderId = _order_id_field()
    lines: tuple[StockLine, ...]


class StockReservationFailed(Payload):
    message_type = "stock.reservation_failed"
    kind = "event"

    order_id: OrderId = _order_id_field()
    reason: str


class StockCommitted(Payload):
    message_type = "stock.committed"
    kind = "event"

    order_id: OrderId = _order_id_field()


class StockCommitFailed(Payload):
    message_type = "stock.commit_failed"
    kind = "event"

    order_id: OrderId = _order_id_field()
    reason: str


class StockReleased(Payload):
    message_type = "stock.released"
    kind = "event"

    order_id: OrderId = _order_id_field()
    lines: tuple[StockLine, ...] = ()


class PaymentAuthorized(Payload):
    message_type = "payment.authorized"
    kind = "event"

    order_id: OrderId = _order_id_field()
    payment_id: str
    amount: Money


class PaymentDeclined(Payload):
    message_type = "payment.declined"
    kind = "event"

    order_id: OrderId = _order_id_field()
    reason: str


class PaymentRefunded(Payload):
    message_type = "payment.refunded"
    kind = "event"

    order_id: OrderId = _order_id_field()
    amount: Money = Field(description="Amount actually returned; 0 when nothing was captured.")


class LedgerUpdated(Payload):
    message_type = "ledger.updated"
    kind = "event"

    order_id: OrderId = _order_id_field()
    transaction_id: str
    postings: tuple[Posting, ...]
    balances: dict[str, int]

    @model_validator(mode="after")
    def _balanced(self) -> LedgerUpdated:
        debits = sum(p.debit for p in self.postings)
        credits = sum(p.credit for p in self.postings)
        if debits != credits:
            raise ValueError(f"postings unbalanced: debits {debits} != credits {credits}")
        return self


class OrderCompleted(Payload):
    message_type = "order.completed"
    kind = "event"

    order_id: OrderId = _order_id_field()
    total: Money


class OrderCancelled(Payload):
    message_type = "order.cancelled"
    kind = "event"

    order_id: OrderId = _order_id_field()
    reason: str


class OrderRejected(Payload):
    message_type = "order.rejected"
    kind = "event"

    order_id: OrderId = _order_id_field()
    reason: str


# ---------------------------------------------------------------- commands


class ReserveStock(Payload):
    message_type = "stock.reserve"
    kind = "command"

    order_id: OrderId = _order_id_field()
    lines: tuple[StockLine, ...] = Field(min_length=1)


class CommitStock(Payload):
    message_type = "stock.commit"
    kind = "command"

    order_id: OrderId = _order_id_field()


class ReleaseStock(Payload):
    message_type = "stock.release"
    kind = "command"

    order_id: OrderId = _order_id_field()


class ChargePayment(Payload):
    message_type = "payment.charge"
    kind = "command"

    order_id: OrderId = _order_id_field()
    amount: Money
    payment_token: str = Field(min_length=1, max_length=128)


class RefundPayment(Payload):
    message_type = "payment.refund"
    kind = "command"

    order_id: OrderId = _order_id_field()


EVENTS: tuple[type[Payload], ...] = (
    OrderCreated,
    StockReserved,
    StockReservationFailed,
    PaymentAuthorized,
    PaymentDeclined,
    StockCommitted,
    StockCommitFailed,
    StockReleased,
    PaymentRefunded,
    LedgerUpdated,
    OrderCompleted,
    OrderCancelled,
    OrderRejected,
)
COMMANDS: tuple[type[Payload], ...] = (
    ReserveStock,
    CommitStock,
    ReleaseStock,
    ChargePayment,
    RefundPayment,
)
