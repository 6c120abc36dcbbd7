"""Payment tables: one charge per order."""

from __future__ import annotations

from sqlalchemy import BigInteger, CheckConstraint, Column, String, Table, Text

from contracts.columns import UtcDateTime
from outbox.tables import metadata

SERVICE = "payments"

payments_charges = Table(
    "payments_charges",
    metadata,
    Column("order_id", String(64), primary_key=True),
    Column("payment_id", String(64), nullable=True),
    Column("status", String(16), nullable=False, doc="authorized|declined|refunded|voided"),
    Column("amount", BigInteger, nullable=False, doc="Minor units."),
    Column("currency", String(3), nullable=False),
    Column("refunded_amount", BigInteger, nullable=False, server_default="0"),
    Column("reason", Text, nullable=True, doc="Why the gateway declined."),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    CheckConstraint("refunded_amount >= 0 AND refunded_amount <= amount", name="ck_payments_charges_refund"),
)
