"""Order persistence on the unit of work's connection, plus reporting tools."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Row, bindparam, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from consumers.orders.rules import Order, OrderStatus
from consumers.orders.tables import orders_orders
from contracts import ConflictError, Money, OrderLine


def _order(row: Row[Any]) -> Order:
    return Order(
        order_id=row.order_id,
        customer_id=row.customer_id,
        status=OrderStatus(row.status),
        total=Money(amount=row.total, currency=row.currency),
        lines=tuple(OrderLine.model_validate(line) for line in row.lines),
        reason=row.reason,
    )


# Built once: these run for every order (bind parameters, not new statements).
_GET_FOR_UPDATE = select(orders_orders).where(orders_orders.c.order_id == bindparam("order_id")).with_for_update()
_INSERT = insert(orders_orders)
_SET_STATUS = (
    update(orders_orders)
    .where(orders_orders.c.order_id == bindparam("b_order_id"), orders_orders.c.status == bindparam("b_expected"))
    .values(status=bindparam("b_status"), reason=bindparam("b_reason"), updated_at=bindparam("b_now"))
)


class OrderStore:
    """Read and change orders inside one open transaction."""

    def __init__(self, connection: AsyncConnection) -> None:
        self.connection = connection

    async def get(self, order_id: str) -> Order | None:
        row = (await self.connection.execute(_GET_FOR_UPDATE, {"order_id": order_id})).one_or_none()
        return _order(row) if row else None

    async def insert(self, order: Order, now: datetime) -> None:
        """Insert an order; a concurrent insert of the same id fails with IntegrityError."""
        await self.connection.execute(
            _INSERT,
            {
                "order_id": order.order_id,
                "customer_id": order.customer_id,
                "status": order.status.value,
                "total": order.total.amount,
                "currency": order.total.currency,
                "lines": [line.model_dump(mode="json") for line in order.lines],
                "reason": order.reason,
                "created_at": now,
                "updated_at": now,
            },
        )

    async def set_status(
        self, order_id: str, status: OrderStatus, reason: str | None, *, expected: OrderStatus, now: datetime
    ) -> None:
        """Move an order on from the status it was read in."""
        result = await self.connection.execute(
            _SET_STATUS,
            {"b_order_id": order_id, "b_expected": expected.value, "b_status": status.value, "b_reason": reason, "b_now": now},
        )
        if result.rowcount != 1:
            raise ConflictError(f"order {order_id} left status {expected} concurrently")


async def order_statuses(engine: AsyncEngine) -> dict[str, str]:
    """Return the status of every order."""
    async with engine.connect() as connection:
        query = select(orders_orders.c.order_id, orders_orders.c.status).order_by(orders_orders.c.order_id)
        rows = (await connection.execute(query)).all()
    return {row.order_id: row.status for row in rows}


async def get_order(engine: AsyncEngine, order_id: str) -> Order | None:
    """Return one order, or None."""
    async with engine.connect() as connection:
        row = (await connection.execute(select(orders_orders).where(orders_orders.c.order_id == order_id))).one_or_none()
    return _order(row) if row else None
