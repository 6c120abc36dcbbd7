"""The benchmark's peer: the same reserve → charge → complete saga as a DBOS workflow.

DBOS Transact runs a workflow in the caller's process and checkpoints every step in
PostgreSQL, so its saga needs no broker: each step is one database transaction that
also records the step's output. This module writes compensa's order saga that way,
on the same server, with the same business rules (all-or-nothing reservation under
row locks, the default gateway's decline rules, double-entry ledger postings,
compensation by release), so `compensa bench saga` can report both side by side.

Optional: `pip install 'compensa[bench]'` brings DBOS in (scripts/bench.sh installs
it); the benchmark says when it is missing.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert

from consumers.payments.gateway import Authorization, RuleBasedGateway
from contracts import Money
from infra.bench.common import closed_loop  # the same loop and percentile as compensa's side of the bench

SKUS = [f"PEER-{i}" for i in range(20)]

metadata = MetaData()
peer_stock = Table(
    "peer_stock",
    metadata,
    Column("sku", String(64), primary_key=True),
    Column("on_hand", Integer, nullable=False),
    Column("reserved", Integer, nullable=False),
)
peer_orders = Table(
    "peer_orders",
    metadata,
    Column("order_id", String(64), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("total", Integer, nullable=False),
)
peer_charges = Table(
    "peer_charges",
    metadata,
    Column("order_id", String(64), primary_key=True),
    Column("amount", Integer, nullable=False),
    Column("status", String(16), nullable=False),
)
peer_ledger = Table(
    "peer_ledger",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("order_id", String(64), nullable=False),
    Column("account", String(64), nullable=False),
    Column("debit", Integer, nullable=False),
    Column("credit", Integer, nullable=False),
)

_LOCK_STOCK = (
    select(peer_stock).where(peer_stock.c.sku.in_(bindparam("skus", expanding=True))).order_by(peer_stock.c.sku).with_for_update()
)
_MOVE_STOCK = (
    update(peer_stock)
    .where(peer_stock.c.sku == bindparam("b_sku"))
    .values(
        on_hand=peer_stock.c.on_hand + bindparam("on_hand_delta"),
        reserved=peer_stock.c.reserved + bindparam("reserved_delta"),
    )
)
_SET_STATUS = update(peer_orders).where(peer_orders.c.order_id == bindparam("b_order_id")).values(status=bindparam("b_status"))

_gateway = RuleBasedGateway()


class _Peer:
    """The datasource, set when the peer starts (the workflow functions are module level)."""

    datasource: Any = None


_peer = _Peer()


def _session() -> Any:
    return _peer.datasource.sql_session()


async def _transaction(function: Any, *args: Any) -> Any:
    # READ COMMITTED with row locks, as compensa's participants do (DBOS defaults to SERIALIZABLE).
    return await _peer.datasource.run_tx_step_async(
        {"name": function.__name__, "isolation_level": "READ COMMITTED"}, function, *args
    )


async def _place(order_id: str, total: int) -> None:
    await _session().execute(pg_insert(peer_orders).values(order_id=order_id, status="pending", total=total))


async def _reserve(lines: Sequence[tuple[str, int]]) -> bool:
    session = _session()
    rows = {row.sku: row for row in (await session.execute(_LOCK_STOCK, {"skus": sorted({sku for sku, _ in lines})})).all()}
    if any(sku not in rows or rows[sku].on_hand - rows[sku].reserved < quantity for sku, quantity in lines):
        return False
    for sku, quantity in lines:
        await session.execute(_MOVE_STOCK, {"b_sku": sku, "on_hand_delta": 0, "reserved_delta": quantity})
    return True


async def _charge(order_id: str, amount: int, token: str) -> bool:
    session = _session()
    # The gateway call inside the charge's transaction: one step fewer than a separate
    # DBOS step would take, which favours the peer.
    decision = isinstance(await _gateway.authorize(order_id, Money(amount=amount, currency="EUR"), token), Authorization)
    await session.execute(
        pg_insert(peer_charges).values(order_id=order_id, amount=amount, status="authorized" if decision else "declined")
    )
    if decision:
        await session.execute(
            pg_insert(peer_ledger),
            [
                {"order_id": order_id, "account": "cash:EUR", "debit": amount, "credit": 0},
                {"order_id": order_id, "account": "receivable:customers", "debit": 0, "credit": amount},
            ],
        )
    return decision


async def _commit(lines: Sequence[tuple[str, int]]) -> None:
    session = _session()
    await session.execute(_LOCK_STOCK, {"skus": sorted({sku for sku, _ in lines})})
    for sku, quantity in lines:
        await session.execute(_MOVE_STOCK, {"b_sku": sku, "on_hand_delta": -quantity, "reserved_delta": -quantity})


async def _release(lines: Sequence[tuple[str, int]]) -> None:
    session = _session()
    await session.execute(_LOCK_STOCK, {"skus": sorted({sku for sku, _ in lines})})
    for sku, quantity in lines:
        await session.execute(_MOVE_STOCK, {"b_sku": sku, "on_hand_delta": 0, "reserved_delta": -quantity})


async def _finish(order_id: str, status: str) -> None:
    await _session().execute(_SET_STATUS, {"b_order_id": order_id, "b_status": status})


def _workflow() -> Any:
    from dbos import DBOS

    @DBOS.workflow(name="peer_order_saga")
    async def order_saga(order_id: str, lines: list[tuple[str, int]], amount: int, token: str) -> str:
        await _transaction(_place, order_id, amount)
        if not await _transaction(_reserve, lines):
            await _transaction(_finish, order_id, "rejected")
            return "rejected"
        if not await _transaction(_charge, order_id, amount, token):
            await _transaction(_release, lines)  # compensation
            await _transaction(_finish, order_id, "cancelled")
            return "cancelled"
        await _transaction(_commit, lines)
        await _transaction(_finish, order_id, "completed")
        return "completed"

    return order_saga


async def dbos_saga_rate(database_url: str, inflights: Sequence[int], seconds: float) -> list[dict[str, float]]:
    """Closed loop per level: `inflight` clients each run a saga workflow and await its result.

    `database_url` should name an empty database: DBOS creates its system tables there.
    """
    from dbos import DBOS, AsyncSQLAlchemyDatasource
    from sqlalchemy.ext.asyncio import create_async_engine

    url = database_url.replace("postgresql+asyncpg://", "postgresql://")
    # 30 + 10 application and 30 system connections: well inside PostgreSQL's default 100.
    engine = create_async_engine(url.replace("postgresql://", "postgresql+psycopg://"), pool_size=30, max_overflow=10)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(metadata.create_all)
            await connection.execute(text("TRUNCATE peer_stock, peer_orders, peer_charges, peer_ledger"))
            await connection.execute(pg_insert(peer_stock), [{"sku": sku, "on_hand": 10_000_000, "reserved": 0} for sku in SKUS])
        _peer.datasource = await AsyncSQLAlchemyDatasource.create(url, engine=engine)
        order_saga = _workflow()
        DBOS(config={"name": "compensa-peer", "system_database_url": url, "sys_db_pool_size": 30, "log_level": "WARNING"})
        DBOS.launch()
        # One saga before timing, as compensa's benchmark does: connections and caches warm.
        await (
            await DBOS.start_workflow_async(order_saga, f"peer-warmup-{uuid.uuid4().hex[:8]}", [(SKUS[0], 1)], 100, "tok_visa")
        ).get_result()
        return [await _closed_loop(order_saga, inflight, seconds) for inflight in inflights]
    finally:
        DBOS.destroy(destroy_registry=True)  # a no-op when DBOS never started
        # DBOS made its own pool the loop's default executor and has just shut it down:
        # give the loop a working one back, or asyncio.to_thread fails from now on.
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor())
        await engine.dispose()


async def _closed_loop(order_saga: Any, inflight: int, seconds: float) -> dict[str, float]:
    from dbos import DBOS

    outcomes: dict[str, int] = {}

    async def one(client: int, _n: int) -> None:
        order_id = f"peer-{uuid.uuid4().hex[:12]}"
        lines = [(SKUS[(client + i) % len(SKUS)], 1 + i) for i in range(2)]
        handle = await DBOS.start_workflow_async(order_saga, order_id, lines, 4_999, "tok_visa")
        outcome = await handle.get_result()
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    result = await closed_loop(inflight, seconds, one)
    return {
        "inflight": inflight,
        "completed": outcomes.get("completed", 0),
        "sagas_per_s": result["per_s"],
        "p50_ms": result["p50_ms"],
        "p99_ms": result["p99_ms"],
    }
