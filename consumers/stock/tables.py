"""Stock tables: counters per SKU and one reservation per order."""

from __future__ import annotations

from sqlalchemy import JSON, BigInteger, CheckConstraint, Column, Index, String, Table, Text

from contracts.columns import UtcDateTime
from outbox.tables import metadata

SERVICE = "stock"

stock_items = Table(
    "stock_items",
    metadata,
    Column("sku", String(64), primary_key=True),
    Column("on_hand", BigInteger, nullable=False, doc="Free to reserve."),
    Column("reserved", BigInteger, nullable=False, server_default="0", doc="Held by open reservations."),
    # The last line of defence: a bug elsewhere fails the transaction instead of
    # overselling.
    CheckConstraint("on_hand >= 0", name="ck_stock_items_on_hand"),
    CheckConstraint("reserved >= 0", name="ck_stock_items_reserved"),
)

stock_reservations = Table(
    "stock_reservations",
    metadata,
    Column("order_id", String(64), primary_key=True),
    Column("status", String(16), nullable=False, doc="reserved|committed|released|voided|failed"),
    Column("lines", JSON, nullable=False, doc="[{sku, quantity}, ...] as requested"),
    Column("reason", Text, nullable=True, doc="Why a reserve failed."),
    Column("expires_at", UtcDateTime(), nullable=True),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    Index("ix_stock_reservations_status_expires", "status", "expires_at"),
)
