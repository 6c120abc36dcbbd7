"""Order tables: one row per order, its status following the saga."""

from __future__ import annotations

from sqlalchemy import JSON, BigInteger, Column, Index, String, Table, Text

from contracts.columns import UtcDateTime
from outbox.tables import metadata

SERVICE = "orders"

orders_orders = Table(
    "orders_orders",
    metadata,
    Column("order_id", String(64), primary_key=True),
    Column("customer_id", String(64), nullable=False),
    Column("status", String(16), nullable=False, doc="pending|completed|cancelled|rejected"),
    Column("total", BigInteger, nullable=False, doc="Minor units."),
    Column("currency", String(3), nullable=False),
    Column("lines", JSON, nullable=False, doc="[{sku, quantity, unit_price}, ...]"),
    Column("reason", Text, nullable=True, doc="Why the order was cancelled or rejected."),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    Index("ix_orders_orders_status", "status"),
    Index("ix_orders_orders_customer", "customer_id"),
)
