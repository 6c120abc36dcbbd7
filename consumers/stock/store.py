"""Stock persistence on the unit of work's connection, plus seeding and reporting tools."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Row, bindparam, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from consumers.common import dialect_insert
from consumers.stock.rules import (
    Decision,
    Level,
    Movement,
    Reservation,
    ReservationStatus,
    quantities,
)
from consumers.stock.tables import stock_items, stock_reservations
from contracts import ConflictError, StockLine


def _reservation(row: Row[Any]) -> Reservation:
    return Reservation(
        order_id=row.order_id,
        status=ReservationStatus(row.status),
        lines=tuple(StockLine.model_validate(line) for line in row.lines),
        expires_at=row.expires_at,
        reason=row.reason,
    )


# Built once: these run for every order (bind parameters, not new statements).
_RESERVATION_FOR_UPDATE = (
    select(stock_reservations).where(stock_reservations.c.order_id == bindparam("order_id")).with_for_update()
)
_RESERVATIONS_FOR_UPDATE = (
    select(stock_reservations)
    .where(stock_reservations.c.order_id.in_(bindparam("order_ids", expanding=True)))
    .order_by(stock_reservations.c.order_id)
    .with_for_update()
)
_LEVELS_FOR_UPDATE = (
    select(stock_items.c.sku, stock_items.c.on_hand, stock_items.c.reserved)
    .where(stock_items.c.sku.in_(bindparam("skus", expanding=True)))
    .order_by(stock_items.c.sku)
    .with_for_update()
)
_INSERT_RESERVATION = insert(stock_reservations)
_UPDATE_RESERVATION = (
    update(stock_reservations)
    .where(
        stock_reservations.c.order_id == bindparam("b_order_id"),
        stock_reservations.c.status == bindparam("b_expected"),
    )
    .values({name: bindparam(name) for name in ("status", "lines", "reason", "expires_at", "updated_at")})
)
# Deltas with a guard, not absolute values: correct even where the backend took no row
# lock between our read and this write.
_MOVE = (
    update(stock_items)
    .where(
        stock_items.c.sku == bindparam("b_sku"),
        stock_items.c.on_hand + bindparam("on_hand_delta") >= 0,
        stock_items.c.reserved + bindparam("reserved_delta") >= 0,
    )
    .values(
        on_hand=stock_items.c.on_hand + bindparam("on_hand_delta"),
        reserved=stock_items.c.reserved + bindparam("reserved_delta"),
    )
)


class StockStore:
    """Read and change stock rows inside one open transaction."""

    def __init__(self, connection: AsyncConnection) -> None:
        self.connection = connection

    async def reservation(self, order_id: str) -> Reservation | None:
        """Load an order's reservation; on Postgres lock it so repeats of one order queue."""
        row = (await self.connection.execute(_RESERVATION_FOR_UPDATE, {"order_id": order_id})).one_or_none()
        return _reservation(row) if row else None

    async def lock_reservations(self, order_ids: Iterable[str]) -> list[Reservation]:
        """Load and lock the orders' reservations in order-id order (those that exist)."""
        rows = (await self.connection.execute(_RESERVATIONS_FOR_UPDATE, {"order_ids": sorted(set(order_ids))})).all()
        return [_reservation(row) for row in rows]

    async def levels(self, skus: Iterable[str]) -> dict[str, Level]:
        """Load and lock the SKUs' counters in SKU order, so concurrent orders never deadlock."""
        rows = (await self.connection.execute(_LEVELS_FOR_UPDATE, {"skus": sorted(set(skus))})).all()
        return {row.sku: Level(row.on_hand, row.reserved) for row in rows}

    async def due_reservations(self, now: datetime, limit: int) -> list[Reservation]:
        """Claim reservations held past their expiry, skipping any another worker holds."""
        query = (
            select(stock_reservations)
            .where(
                stock_reservations.c.status == ReservationStatus.RESERVED.value,
                stock_reservations.c.expires_at <= now,
            )
            .order_by(stock_reservations.c.expires_at, stock_reservations.c.order_id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return [_reservation(row) for row in (await self.connection.execute(query)).all()]

    async def record(self, before: Reservation | None, decision: Decision, now: datetime) -> None:
        """Apply a decision's movements and store its reservation."""
        await self.move(decision.movements)
        if decision.reservation is not None:
            await self.save(decision.reservation, expected=before.status if before else None, now=now)

    async def move(self, movements: Iterable[Movement]) -> None:
        """Lock the SKUs, then apply counter deltas; refuse (to retry) any made impossible."""
        moves = sorted((m for m in movements if m.on_hand or m.reserved), key=lambda m: m.sku)
        if not moves:
            return
        await self.levels(move.sku for move in moves)
        for move in moves:
            result = await self.connection.execute(
                _MOVE, {"b_sku": move.sku, "on_hand_delta": move.on_hand, "reserved_delta": move.reserved}
            )
            if result.rowcount != 1:
                raise ConflictError(f"stock of SKU {move.sku!r} changed under movement {move}")

    async def save(self, reservation: Reservation, *, expected: ReservationStatus | None, now: datetime) -> None:
        """Insert a new reservation, or move one on from the status it was read in."""
        values = {
            "status": reservation.status.value,
            "lines": [line.model_dump(mode="json") for line in reservation.lines],
            "reason": reservation.reason,
            "expires_at": reservation.expires_at,
            "updated_at": now,
        }
        if expected is None:
            await self.connection.execute(_INSERT_RESERVATION, {"order_id": reservation.order_id, "created_at": now, **values})
            return
        result = await self.connection.execute(
            _UPDATE_RESERVATION, {"b_order_id": reservation.order_id, "b_expected": expected.value, **values}
        )
        if result.rowcount != 1:
            raise ConflictError(f"reservation {reservation.order_id} left status {expected} concurrently")


async def seed_stock(engine: AsyncEngine, levels: dict[str, int]) -> None:
    """Set on_hand per SKU, creating missing SKUs; reserved counts are kept."""
    if not levels:
        return
    async with engine.begin() as connection:
        statement = dialect_insert(connection, stock_items)
        statement = statement.on_conflict_do_update(
            index_elements=[stock_items.c.sku], set_={"on_hand": statement.excluded.on_hand}
        )
        await connection.execute(statement, [{"sku": sku, "on_hand": on_hand, "reserved": 0} for sku, on_hand in levels.items()])


async def stock_levels(engine: AsyncEngine) -> dict[str, tuple[int, int]]:
    """Return (on_hand, reserved) per SKU."""
    async with engine.connect() as connection:
        rows = (await connection.execute(select(stock_items).order_by(stock_items.c.sku))).all()
    return {row.sku: (row.on_hand, row.reserved) for row in rows}


async def committed_stock(engine: AsyncEngine) -> dict[str, int]:
    """Return the quantity per SKU sold through committed reservations."""
    async with engine.connect() as connection:
        rows = (
            await connection.execute(
                select(stock_reservations.c.lines).where(stock_reservations.c.status == ReservationStatus.COMMITTED.value)
            )
        ).all()
    totals: dict[str, int] = {}
    for row in rows:
        for sku, quantity in quantities(StockLine.model_validate(line) for line in row.lines).items():
            totals[sku] = totals.get(sku, 0) + quantity
    return dict(sorted(totals.items()))


async def reservation_statuses(engine: AsyncEngine) -> dict[str, str]:
    """Return the reservation status per order."""
    async with engine.connect() as connection:
        rows = (
            await connection.execute(
                select(stock_reservations.c.order_id, stock_reservations.c.status).order_by(stock_reservations.c.order_id)
            )
        ).all()
    return {row.order_id: row.status for row in rows}
