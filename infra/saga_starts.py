"""Orders that entered and have no saga after a bound: the read query `compensa health`
and `compensa saga list --stuck-for` share.

It reads the orders service's table and the outboxes that send `order.created`, so it
cannot sit in `sagas/queries.py` (sagas imports only contracts); infra may read them all.

Two ways in: a pending row in `orders_orders` (placed, or consumed from an upstream
`order.created`), and an `order.created` the orders or ingest outbox has sent (the saga
service may have lost it while the orders service never saw it either).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import exists, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from consumers.orders.tables import orders_orders
from contracts.messages import OrderCreated
from outbox.tables import tables_for
from sagas.tables import saga_instances

#: Outboxes whose `order.created` starts a saga.
SAGA_START_OUTBOXES = ("orders", "ingest")
#: How far back sent `order.created` rows are matched against sagas, at least (the
#: scan is bounded; older orders that reached the orders service stay visible as
#: pending orders without a saga).
SAGA_START_LOOKBACK = timedelta(hours=1)


@dataclass(frozen=True)
class Unstarted:
    """One order without a saga: its id (the saga id it should have), when it entered, and how."""

    order_id: str
    entered_at: datetime
    #: `orders` for a pending order row, else the outbox (`orders`, `ingest`) that sent its `order.created`.
    source: str
    #: True for a pending order row, False for a sent `order.created`.
    pending_order: bool


@dataclass(frozen=True)
class UnstartedOrders:
    """Counts of each kind, and the oldest of each (at most the limit asked for), oldest first."""

    pending_count: int = 0
    pending: list[Unstarted] = field(default_factory=list)
    sent_by_outbox: dict[str, int] = field(default_factory=dict)
    sent: list[Unstarted] = field(default_factory=list)

    @property
    def sent_count(self) -> int:
        return sum(self.sent_by_outbox.values())

    @property
    def none(self) -> bool:
        return self.pending_count == 0 and self.sent_count == 0

    def orders(self) -> list[Unstarted]:
        """Each order once (a pending row wins over its sent `order.created`), oldest first."""
        seen: dict[str, Unstarted] = {}
        for item in [*self.pending, *self.sent]:
            seen.setdefault(item.order_id, item)
        return _oldest_first(seen.values())


def _oldest_first(items: Iterable[Unstarted]) -> list[Unstarted]:
    return sorted(items, key=lambda u: (u.entered_at, u.order_id))


async def orders_without_saga(connection: AsyncConnection, now: datetime, bound: timedelta, limit: int) -> UnstartedOrders:
    """Orders that entered more than `bound` before `now` and have no `saga_instances` row.

    Sent `order.created` rows are matched over the hour before the bound (or ten bounds
    when that is longer), to keep the scan bounded.
    """
    cutoff = now - bound
    orders = orders_orders.c
    pending = select(orders.order_id, orders.created_at).where(
        orders.status == "pending",
        orders.created_at < cutoff,
        ~exists().where(saga_instances.c.saga_id == orders.order_id),
    )
    pending_count = (await connection.execute(select(func.count()).select_from(pending.subquery()))).scalar_one()
    oldest_pending = (await connection.execute(pending.order_by(orders.created_at, orders.order_id).limit(limit))).all()

    since = cutoff - max(SAGA_START_LOOKBACK, 10 * bound)
    sent: dict[str, int] = {}
    oldest_sent: list[Unstarted] = []
    for service in SAGA_START_OUTBOXES:
        outbox = tables_for(service).outbox.c
        orphans = (
            select(outbox.correlation_id, func.min(outbox.sent_at).label("sent_at"))
            .where(
                outbox.type == OrderCreated.message_type,
                outbox.sent_at.is_not(None),
                outbox.sent_at < cutoff,
                outbox.sent_at >= since,
                ~exists().where(saga_instances.c.saga_id == outbox.correlation_id),
            )
            .group_by(outbox.correlation_id)
        )
        sent[service] = (await connection.execute(select(func.count()).select_from(orphans.subquery()))).scalar_one()
        rows = (await connection.execute(orphans.order_by(func.min(outbox.sent_at), outbox.correlation_id).limit(limit))).all()
        oldest_sent += [Unstarted(row.correlation_id, row.sent_at, service, pending_order=False) for row in rows]
    return UnstartedOrders(
        pending_count=pending_count,
        pending=[Unstarted(row.order_id, row.created_at, "orders", pending_order=True) for row in oldest_pending],
        sent_by_outbox=sent,
        sent=_oldest_first(oldest_sent)[:limit],
    )
