"""Ledger persistence on the unit of work's connection, plus the trial balance."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import cache
from typing import Any

from sqlalchemy import bindparam, func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from consumers.ledger.rules import Kind
from consumers.ledger.tables import ledger_balances, ledger_entries, ledger_transactions
from contracts import Posting
from outbox.uow import insert_for

# Built once (per dialect where ON CONFLICT is spelled per backend): these run for
# every posting, and building a statement costs more than running it.
_INSERT_ENTRIES = insert(ledger_entries)
_BALANCES = (
    select(ledger_balances.c.account, ledger_balances.c.balance)
    .where(ledger_balances.c.account.in_(bindparam("accounts", expanding=True)))
    .order_by(ledger_balances.c.account)
)


@cache
def _statements(dialect: str) -> tuple[Any, Any]:
    """(open a transaction unless posted already, add to a balance) for this dialect."""
    open_transaction = insert_for(dialect, ledger_transactions).on_conflict_do_nothing(
        index_elements=[ledger_transactions.c.transaction_id]
    )
    add_to_balance = insert_for(dialect, ledger_balances)
    add_to_balance = add_to_balance.on_conflict_do_update(
        index_elements=[ledger_balances.c.account],
        set_={"balance": ledger_balances.c.balance + add_to_balance.excluded.balance},
    )
    return open_transaction, add_to_balance


class LedgerStore:
    """Write postings inside one open transaction."""

    def __init__(self, connection: AsyncConnection) -> None:
        self.connection = connection

    async def open_transaction(self, transaction_id: str, order_id: str, kind: Kind, now: datetime) -> bool:
        """Record the transaction; return False when it was posted already."""
        open_transaction, _ = _statements(self.connection.dialect.name)
        result = await self.connection.execute(
            open_transaction,
            {"transaction_id": transaction_id, "order_id": order_id, "kind": kind.value, "created_at": now},
        )
        return result.rowcount == 1

    async def add_entries(self, transaction_id: str, postings: Sequence[Posting]) -> None:
        await self.connection.execute(
            _INSERT_ENTRIES,
            [{"transaction_id": transaction_id, **posting.model_dump()} for posting in postings],
        )

    async def apply_balances(self, changes: Mapping[str, int]) -> dict[str, int]:
        """Add the changes to the accounts' balances; return the new balances."""
        await self._add_to_balances(changes)
        rows = await self.connection.execute(_BALANCES, {"accounts": sorted(changes)})
        return {row.account: row.balance for row in rows}

    async def lock_balances(self, accounts: Iterable[str]) -> None:
        """Lock the accounts' balance rows, in account order, creating the missing ones at zero."""
        await self._add_to_balances(dict.fromkeys(accounts, 0))

    async def _add_to_balances(self, changes: Mapping[str, int]) -> None:
        _, add_to_balance = _statements(self.connection.dialect.name)
        # In account order, so concurrent postings lock balance rows in one order.
        for account in sorted(changes):
            await self.connection.execute(add_to_balance, {"account": account, "balance": changes[account]})


async def trial_balance(engine: AsyncEngine) -> dict[str, Any]:
    """Return total debits, total credits and every account's balance."""
    async with engine.connect() as connection:
        debits, credits = (
            await connection.execute(
                select(
                    func.coalesce(func.sum(ledger_entries.c.debit), 0),
                    func.coalesce(func.sum(ledger_entries.c.credit), 0),
                )
            )
        ).one()
        rows = (await connection.execute(select(ledger_balances).order_by(ledger_balances.c.account))).all()
    return {
        "debits": int(debits),
        "credits": int(credits),
        "balanced": int(debits) == int(credits),
        "balances": {row.account: row.balance for row in rows},
    }


async def cash_by_order(engine: AsyncEngine) -> dict[str, int]:
    """Return net cash (captured minus refunded) per order, to match against payments."""
    query = (
        select(
            ledger_transactions.c.order_id,
            func.sum(ledger_entries.c.debit - ledger_entries.c.credit).label("net"),
        )
        .join(ledger_entries, ledger_entries.c.transaction_id == ledger_transactions.c.transaction_id)
        .where(ledger_entries.c.account.like("cash:%"))
        .group_by(ledger_transactions.c.order_id)
        .order_by(ledger_transactions.c.order_id)
    )
    async with engine.connect() as connection:
        rows = (await connection.execute(query)).all()
    return {row.order_id: int(row.net) for row in rows}
