"""Stock handlers: one per command, plus the sweeper that expires stale reservations."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from functools import partial
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from consumers.stock import rules
from consumers.stock.store import StockStore
from consumers.stock.tables import SERVICE
from contracts import Message
from contracts.clock import Clock
from contracts.messages import CommitStock, ReleaseStock, ReserveStock
from outbox.uow import Handler, UnitOfWork

log = structlog.get_logger("compensa.stock")


async def handle_reserve_stock(
    uow: UnitOfWork, message: Message[ReserveStock], *, ttl: timedelta = rules.RESERVATION_TTL
) -> None:
    """Reserve every line of the order, or none of them."""
    command = message.payload
    store = StockStore(uow.connection)
    existing = await store.reservation(command.order_id)
    levels = {} if existing else await store.levels(line.sku for line in command.lines)
    decision = rules.decide_reserve(existing, levels, command.order_id, command.lines, now=uow.now(), ttl=ttl)
    await store.record(existing, decision, uow.now())
    uow.send(decision.event)


async def handle_commit_stock(uow: UnitOfWork, message: Message[CommitStock]) -> None:
    """Turn the order's reservation into a sale."""
    order_id = message.payload.order_id
    store = StockStore(uow.connection)
    existing = await store.reservation(order_id)
    decision = rules.decide_commit(existing, order_id, now=uow.now())
    await store.record(existing, decision, uow.now())
    uow.send(decision.event)


async def handle_release_stock(uow: UnitOfWork, message: Message[ReleaseStock]) -> None:
    """Give the order's stock back, or void the order if nothing was reserved yet."""
    order_id = message.payload.order_id
    store = StockStore(uow.connection)
    existing = await store.reservation(order_id)
    decision = rules.decide_release(existing, order_id)
    await store.record(existing, decision, uow.now())
    uow.send(decision.event)


async def lock_batch(uow: UnitOfWork, messages: Sequence[Message[Any]]) -> None:
    """Lock every row a batch of stock commands will touch, up front: reservations, then SKUs, each sorted.

    Every command locks its own rows in that order, but a batch takes them command
    after command; two processes' batches could each hold a SKU the other one waits
    for. Taken all at once, sorted, the locks of concurrent batches queue instead.
    """
    store = StockStore(uow.connection)
    reservations = await store.lock_reservations(message.payload.order_id for message in messages)
    skus = {line.sku for reservation in reservations for line in reservation.lines}
    skus.update(line.sku for message in messages if isinstance(message.payload, ReserveStock) for line in message.payload.lines)
    await store.levels(skus)


def make_handlers(*, reservation_ttl: timedelta = rules.RESERVATION_TTL) -> dict[str, Handler]:
    """Return the stock handlers keyed by command type."""
    return {
        ReserveStock.message_type: partial(handle_reserve_stock, ttl=reservation_ttl),
        CommitStock.message_type: handle_commit_stock,
        ReleaseStock.message_type: handle_release_stock,
    }


HANDLERS: dict[str, Handler] = make_handlers()


async def expire_reservations(engine: AsyncEngine, clock: Clock, limit: int = 100) -> int:
    """Release reservations held past their expiry; return how many were released."""
    async with UnitOfWork(engine, SERVICE, clock) as uow:
        store = StockStore(uow.connection)
        now = uow.now()
        due = await store.due_reservations(now, limit)
        if not due:
            return 0
        # Lock every SKU of the batch at once, in SKU order, as reserve does:
        # locking per reservation could interleave with a reserve and deadlock.
        await store.levels(line.sku for reservation in due for line in reservation.lines)
        released: list[str] = []
        for reservation in due:
            decision = rules.decide_expiry(reservation, now=now)
            if decision is None:
                continue
            await store.record(reservation, decision, now)
            uow.send(decision.event, correlation_id=reservation.order_id)
            released.append(reservation.order_id)
        await uow.commit()
    log.info("stock.reservations_expired", count=len(released), orders=released)
    return len(released)
