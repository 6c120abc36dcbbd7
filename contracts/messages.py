"""Payload models of every event and command in the catalogue.

Events are past tense, commands imperative. Money is always integer minor units
plus an ISO 4217 currency. No card number or secret travels: payments carry a token.

Every edge (HTTP, SDK, broker) validates with these models, so they are strict:
no type coercion (``"2"`` or ``true`` is not a quantity), numbers bounded to what
the database columns hold, and no control characters in identifiers (PostgreSQL
text cannot hold NUL; a terminal or log must not be steered by an id).
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, StringConstraints, model_validator

#: Largest amount of money one message may carry, in minor units. Ledger balances are
#: int64 sums of amounts: this leaves room for about a million maximal orders.
MAX_AMOUNT = 10**13

#: Characters no identifier may hold: C0 and C1 controls, and the bidirectional
#: overrides that make a terminal show an id other than the one stored.
_FORBIDDEN = r"\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069"
#: An identifier: 1-64 characters, not all blank, none of them forbidden.
Identifier = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=rf"^[^{_FORBIDDEN}]*[^\s{_FORBIDDEN}][^{_FORBIDDEN}]*$")
]
#: A reference built from an identifier (e.g. `capture:<order id>`): up to 96 characters.
Reference = Annotated[
    str, StringConstraints(min_length=1, max_length=96, pattern=rf"^[^{_FORBIDDEN}]*[^\s{_FORBIDDEN}][^{_FORBIDDEN}]*$")
]
#: Longest free text (a reason) a message carries.
MAX_TEXT = 2000
#: Free text (a reason): bounded, no NUL (tabs and newlines are fine).
Text = Annotated[str, StringConstraints(max_length=MAX_TEXT, pattern=r"^[^\x00]*$")]


def clip_text(text: str) -> str:
    """Free text cut to what a message carries: a reason built from many parts stays sendable."""
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


#: A count or amount: a JSON integer, never a string or a boolean.
StrictInt = Annotated[int, Strict()]
OrderId = Identifier


class Payload(BaseModel):
    """Base of every message payload; subclasses name their type and version."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    message_type: ClassVar[str]
    message_version: ClassVar[int] = 1
    kind: ClassVar[Literal["event", "command"]]
    #: The payload field that names the saga the message belongs to: the envelope's
    #: correlation id must equal it (checked by `contracts.validate_payload`), so a
    #: message can only ever act on the saga of its own business key.
    saga_key: ClassVar[str | None] = None


class OrderPayload(Payload):
    """A message of one order's saga: its correlation id is its order id."""

    saga_key: ClassVar[str | None] = "order_id"

    order_id: OrderId


class Money(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    amount: StrictInt = Field(ge=0, le=MAX_AMOUNT, description="Amount in minor units (cents).")
    currency: str = Field(pattern=r"^[A-Z]{3}$", description="ISO 4217 code.")


class StockLine(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    sku: Identifier
    quantity: StrictInt = Field(gt=0, le=1_000_000)


class OrderLine(StockLine):
    unit_price: StrictInt = Field(ge=0, le=MAX_AMOUNT, description="Unit price in minor units.")


class Posting(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    account: Identifier
    debit: StrictInt = Field(ge=0, le=MAX_AMOUNT)
    credit: StrictInt = Field(ge=0, le=MAX_AMOUNT)


# ---------------------------------------------------------------- events


class OrderCreated(OrderPayload):
    message_type = "order.created"
    kind = "event"

    customer_id: Identifier
    lines: tuple[OrderLine, ...] = Field(min_length=1, max_length=100)
    total: Money
    payment_token: str = Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")

    @model_validator(mode="after")
    def _total_matches_lines(self) -> OrderCreated:
        expected = sum(line.quantity * line.unit_price for line in self.lines)
        if expected != self.total.amount:
            raise ValueError(f"total.amount {self.total.amount} != sum of lines {expected}")
        return self


class StockReserved(OrderPayload):
    message_type = "stock.reserved"
    kind = "event"

    lines: tuple[StockLine, ...]


class StockReservationFailed(OrderPayload):
    message_type = "stock.reservation_failed"
    kind = "event"

    reason: Text


class StockCommitted(OrderPayload):
    message_type = "stock.committed"
    kind = "event"


class StockCommitFailed(OrderPayload):
    message_type = "stock.commit_failed"
    kind = "event"

    reason: Text


class StockReleased(OrderPayload):
    message_type = "stock.released"
    kind = "event"

    lines: tuple[StockLine, ...] = ()


class PaymentAuthorized(OrderPayload):
    message_type = "payment.authorized"
    kind = "event"

    payment_id: Identifier
    amount: Money


class PaymentDeclined(OrderPayload):
    message_type = "payment.declined"
    kind = "event"

    reason: Text


class PaymentRefunded(OrderPayload):
    message_type = "payment.refunded"
    kind = "event"

    amount: Money = Field(description="Amount actually returned; 0 when nothing was captured.")


class LedgerUpdated(OrderPayload):
    message_type = "ledger.updated"
    kind = "event"

    transaction_id: Reference
    postings: tuple[Posting, ...]
    balances: dict[Identifier, Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]]

    @model_validator(mode="after")
    def _balanced(self) -> LedgerUpdated:
        debits = sum(p.debit for p in self.postings)
        credits = sum(p.credit for p in self.postings)
        if debits != credits:
            raise ValueError(f"postings unbalanced: debits {debits} != credits {credits}")
        return self


class OrderCompleted(OrderPayload):
    message_type = "order.completed"
    kind = "event"

    total: Money


class OrderCancelled(OrderPayload):
    message_type = "order.cancelled"
    kind = "event"

    reason: Text


class OrderRejected(OrderPayload):
    message_type = "order.rejected"
    kind = "event"

    reason: Text


# ---------------------------------------------------------------- commands


class ReserveStock(OrderPayload):
    message_type = "stock.reserve"
    kind = "command"

    lines: tuple[StockLine, ...] = Field(min_length=1)


class CommitStock(OrderPayload):
    message_type = "stock.commit"
    kind = "command"


class ReleaseStock(OrderPayload):
    message_type = "stock.release"
    kind = "command"


class ChargePayment(OrderPayload):
    message_type = "payment.charge"
    kind = "command"

    amount: Money
    payment_token: str = Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")


class RefundPayment(OrderPayload):
    message_type = "payment.refund"
    kind = "command"


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
