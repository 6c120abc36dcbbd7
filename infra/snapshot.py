"""Read the final state of a run (simulated or real) into an invariant-checker snapshot."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from consumers.ledger.tables import ledger_entries, ledger_transactions
from consumers.orders.tables import orders_orders
from consumers.payments.tables import payments_charges
from consumers.stock.tables import stock_items, stock_reservations
from infra.services import OUTBOX_SERVICES
from outbox.tables import tables_for
from sagas.simulation.invariants import Snapshot
from sagas.simulation.workload import Workload
from sagas.tables import saga_instances


def _lines(value: Any) -> list[dict[str, Any]]:
    return json.loads(value) if isinstance(value, str) else list(value or [])


async def read_snapshot(engine: AsyncEngine, workload: Workload, broker: Any | None) -> Snapshot:
    """Collect every fact the invariants need, from the services' own tables."""
    async with engine.connect() as c:
        saga_status = dict((await c.execute(select(saga_instances.c.saga_id, saga_instances.c.status))).all())
        order_status = dict((await c.execute(select(orders_orders.c.order_id, orders_orders.c.status))).all())
        stock = {
            row.sku: (int(row.on_hand), int(row.reserved))
            for row in (await c.execute(select(stock_items))).all()
        }
        committed_units: Counter[str] = Counter()
        committed_by_order: Counter[str] = Counter()
        for row in (await c.execute(select(stock_reservations).where(stock_reservations.c.status == "committed"))).all():
            for line in _lines(row.lines):
                committed_units[line["sku"]] += int(line["quantity"])
                committed_by_order[row.order_id] += int(line["quantity"])
        payments = {}
        for row in (await c.execute(select(payments_charges))).all():
            captured = int(row.amount) if row.status in ("authorized", "refunded") else 0
            payments[row.order_id] = (captured, int(row.refunded_amount))
        debits, credits = (
            await c.execute(select(func.coalesce(func.sum(ledger_entries.c.debit), 0), func.coalesce(func.sum(ledger_entries.c.credit), 0)))
        ).one()
        ledger_by_order: dict[str, list[int]] = {}
        kinds: Counter[tuple[str, str]] = Counter()
        postings = (
            await c.execute(
                select(ledger_transactions.c.order_id, ledger_transactions.c.kind, func.sum(ledger_entries.c.debit))
                .join(ledger_entries, ledger_entries.c.transaction_id == ledger_transactions.c.transaction_id)
                .group_by(ledger_transactions.c.transaction_id, ledger_transactions.c.order_id, ledger_transactions.c.kind)
            )
        ).all()
        for order_id, kind, amount in postings:
            kinds[(order_id, kind)] += 1
            entry = ledger_by_order.setdefault(order_id, [0, 0])
            entry[0 if kind == "capture" else 1] += int(amount)
        outbox_pending = {}
        for service in OUTBOX_SERVICES:
            outbox = tables_for(service).outbox
            outbox_pending[service] = int(
                (await c.execute(select(func.count()).select_from(outbox).where(outbox.c.sent_at.is_(None)))).scalar_one()
            )
    # Every order the payment service never saw has captured nothing and refunded nothing.
    for order_id in workload.orders:
        payments.setdefault(order_id.order_id, (0, 0))
    stats = broker.stats if broker is not None else None
    return Snapshot(
        placed={o.order_id: o.total for o in workload.orders},
        saga_status=saga_status,
        order_status=order_status,
        initial_stock=dict(workload.stock),
        stock=stock,
        committed_units=dict(committed_units),
        committed_by_order=dict(committed_by_order),
        payments={k: v for k, v in payments.items() if v != (0, 0) or k in ledger_by_order},
        ledger_debits=int(debits),
        ledger_credits=int(credits),
        ledger_by_order={k: (v[0], v[1]) for k, v in ledger_by_order.items()},
        ledger_duplicates=sorted(k for k, n in kinds.items() if n > 1),
        outbox_pending=outbox_pending,
        published_ids=set(stats.published_ids) if stats else set(),
        consumed_ids=set(stats.settled_ids) if stats else set(),
        dead_lettered=dict(stats.dead_letter_reasons) if stats else {},
        unrouted_ids=set(stats.unrouted_ids) if stats else set(),
        messages_left_in_queues=broker.work_depth() if broker is not None else 0,
    )
