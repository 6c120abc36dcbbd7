"""Ledger tables: transactions, their double-entry lines, and running balances."""

from __future__ import annotations

from sqlalchemy import BigInteger, CheckConstraint, Column, ForeignKey, Index, String, Table

from contracts.columns import UtcDateTime
from outbox.tables import Id, metadata

SERVICE = "ledger"

ledger_transactions = Table(
    "ledger_transactions",
    metadata,
    Column("transaction_id", String(96), primary_key=True, doc="<kind>:<order_id>, one per fact"),
    Column("order_id", String(64), nullable=False),
    Column("kind", String(16), nullable=False, doc="capture|refund"),
    Column("created_at", UtcDateTime(), nullable=False),
    Index("ix_ledger_transactions_order", "order_id"),
)

ledger_entries = Table(
    "ledger_entries",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column(
        "transaction_id",
        String(96),
        ForeignKey("ledger_transactions.transaction_id"),
        nullable=False,
    ),
    Column("account", String(64), nullable=False),
    Column("debit", BigInteger, nullable=False),
    Column("credit", BigInteger, nullable=False),
    CheckConstraint("debit >= 0 AND credit >= 0", name="ck_ledger_entries_amounts"),
    Index("ix_ledger_entries_transaction", "transaction_id"),
    Index("ix_ledger_entries_account", "account"),
)

ledger_balances = Table(
    "ledger_balances",
    metadata,
    Column("account", String(64), primary_key=True),
    Column("balance", BigInteger, nullable=False, doc="Debits minus credits."),
)
