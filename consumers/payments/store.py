"""Payment persistence on the unit of work's connection, plus reporting tools."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Row, bindparam, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from consumers.payments.rules import Charge, ChargeStatus
from consumers.payments.tables import payments_charges
from contracts import ConflictError, Money


def _charge(row: Row[Any]) -> Charge:
    return Charge(
        order_id=row.order_id,
        status=ChargeStatus(row.status),
        amount=Money(amount=row.amount, currency=row.currency),
        payment_id=row.payment_id,
        refunded_amount=row.refunded_amount,
        reason=row.reason,
    )


def _values(charge: Charge, now: datetime) -> dict[str, Any]:
    return {
        "status": charge.status.value,
        "payment_id": charge.payment_id,
        "amount": charge.amount.amount,
        "currency": charge.amount.currency,
        "refunded_amount": charge.refunded_amount,
        "reason": charge.reason,
        "updated_at": now,
    }


_CHANGED = ("status", "payment_id", "amount", "currency", "refunded_amount", "reason", "updated_at")
# Built once: these run for every order (bind parameters, not new statements).
_CHARGE_FOR_UPDATE = select(payments_charges).where(payments_charges.c.order_id == bindparam("order_id")).with_for_update()
_INSERT = insert(payments_charges)
_UPDATE = (
    update(payments_charges)
    .where(payments_charges.c.order_id == bindparam("b_order_id"), payments_charges.c.status == bindparam("b_expected"))
    .values({name: bindparam(name) for name in _CHANGED})
)


class PaymentStore:
    """Read and change charges inside one open transaction."""

    def __init__(self, connection: AsyncConnection) -> None:
        self.connection = connection

    async def charge(self, order_id: str) -> Charge | None:
        """Load an order's charge; on Postgres lock it so repeats of one order queue."""
        row = (await self.connection.execute(_CHARGE_FOR_UPDATE, {"order_id": order_id})).one_or_none()
        return _charge(row) if row else None

    async def insert(self, charge: Charge, now: datetime) -> None:
        """Insert a charge; a concurrent insert for the same order fails and is retried."""
        await self.connection.execute(_INSERT, {"order_id": charge.order_id, "created_at": now, **_values(charge, now)})

    async def update(self, charge: Charge, *, expected: ChargeStatus, now: datetime) -> None:
        """Move a charge on from the status it was read in."""
        result = await self.connection.execute(
            _UPDATE, {"b_order_id": charge.order_id, "b_expected": expected.value, **_values(charge, now)}
        )
        if result.rowcount != 1:
            raise ConflictError(f"charge of order {charge.order_id} left status {expected} concurrently")


async def charges(engine: AsyncEngine) -> dict[str, Charge]:
    """Return every order's charge."""
    async with engine.connect() as connection:
        rows = (await connection.execute(select(payments_charges).order_by(payments_charges.c.order_id))).all()
    return {row.order_id: _charge(row) for row in rows}


async def net_captured(engine: AsyncEngine) -> dict[str, int]:
    """Return captured minus refunded per charged order, in minor units."""
    return {
        order_id: charge.amount.amount - charge.refunded_amount
        for order_id, charge in (await charges(engine)).items()
        if charge.status in (ChargeStatus.AUTHORIZED, ChargeStatus.REFUNDED)
    }
