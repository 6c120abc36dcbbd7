"""Read the end of a run (simulated or real) back: the invariant snapshot, outcomes, histories.

`read_back` is the one call a run makes when it is over: the services' tables, what
the broker side saw (`Observed`), the message ids marked sent and consumed, the
invariant check and each saga's outcome and duration.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from sqlalchemy import distinct, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from consumers.ledger.tables import ledger_entries, ledger_transactions
from consumers.orders.tables import orders_orders
from consumers.payments.tables import payments_charges
from consumers.stock.tables import stock_items, stock_reservations
from contracts.envelope import parse_envelope
from infra import topology as t
from infra.bootstrap import MESSAGE_SERVICES, OUTBOX_SERVICES
from outbox.tables import tables_for
from sagas.engine import RETRY_TRIGGER
from sagas.simulation.coverage import HistoryCounts
from sagas.simulation.invariants import Snapshot, Violation, check
from sagas.simulation.liveness import OUTCOMES, SagaTimes
from sagas.simulation.workload import Workload
from sagas.tables import saga_history, saga_instances


@dataclass(frozen=True)
class Observed:
    """What only the broker side saw; the services' tables cannot tell it."""

    published_ids: set[str] = field(default_factory=set)
    dead_lettered: Mapping[str, str] = field(default_factory=dict)
    unrouted_ids: set[str] = field(default_factory=set)
    messages_left: int = 0
    #: Message ids acknowledged by a consumer; None: those in the services' inboxes.
    consumed_ids: set[str] | None = None


@dataclass(frozen=True)
class ReadBack:
    snapshot: Snapshot
    violations: list[Violation]
    #: saga id -> seconds from start to its last transition
    durations: dict[str, float]
    #: status -> sagas in it
    outcomes: dict[str, int]
    #: saga id -> its transitions, for the slowest saga and every violating one
    history: dict[str, list[dict[str, Any]]]


async def read_back(
    engine: AsyncEngine, workload: Workload, observed: Observed, more_violations: list[Violation] | None = None
) -> ReadBack:
    """Everything a report needs about the run that ended: snapshot, violations, outcomes.

    `more_violations` (a liveness check's, say) join the invariants' and have their
    sagas' histories read too.
    """
    sent, consumed = await message_ids(engine)
    snapshot = replace(
        await read_snapshot(engine, workload, messages_left=observed.messages_left),
        published_ids=set(observed.published_ids),
        consumed_ids=set(observed.consumed_ids) if observed.consumed_ids is not None else consumed,
        dead_lettered=dict(observed.dead_lettered),
        unrouted_ids=set(observed.unrouted_ids),
        marked_sent_ids=sent,
    )
    violations = check(snapshot) + list(more_violations or ())
    durations, outcomes, history = await read_outcomes(engine, violations)
    return ReadBack(snapshot, violations, durations, outcomes, history)


def _lines(value: Any) -> list[dict[str, Any]]:
    return json.loads(value) if isinstance(value, str) else list(value or [])


async def read_snapshot(engine: AsyncEngine, workload: Workload, *, messages_left: int = 0) -> Snapshot:
    """Collect every fact the invariants need from the services' own tables.

    What the broker saw (published, consumed, dead-lettered ids) is left empty and the
    sent ids unknown: `read_back` fills them in.
    """
    async with engine.connect() as c:
        saga_status = dict((await c.execute(select(saga_instances.c.saga_id, saga_instances.c.status))).all())
        order_status = dict((await c.execute(select(orders_orders.c.order_id, orders_orders.c.status))).all())
        stock = {row.sku: (int(row.on_hand), int(row.reserved)) for row in (await c.execute(select(stock_items))).all()}
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
            await c.execute(
                select(func.coalesce(func.sum(ledger_entries.c.debit), 0), func.coalesce(func.sum(ledger_entries.c.credit), 0))
            )
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
        published_ids=set(),
        consumed_ids=set(),
        dead_lettered={},
        unrouted_ids=set(),
        messages_left_in_queues=messages_left,
    )


async def message_ids(
    engine: AsyncEngine, outboxes: Sequence[str] = OUTBOX_SERVICES, consumers: Sequence[str] = MESSAGE_SERVICES
) -> tuple[set[str], set[str]]:
    """Ids of every outbox row marked sent, and of every message in a service's inbox."""
    sent: set[str] = set()
    consumed: set[str] = set()
    async with engine.connect() as connection:
        for service in outboxes:
            outbox = tables_for(service).outbox
            rows = await connection.execute(select(outbox.c.message_id).where(outbox.c.sent_at.is_not(None)))
            sent.update(str(row.message_id) for row in rows)
        for service in consumers:
            inbox = tables_for(service).inbox
            consumed.update(str(row.message_id) for row in await connection.execute(select(inbox.c.message_id)))
    return sent, consumed


async def read_outcomes(
    engine: AsyncEngine, violations: list[Violation]
) -> tuple[dict[str, float], dict[str, int], dict[str, list[dict[str, Any]]]]:
    """Per saga: duration and outcome; the history of the slowest and of every violating saga."""
    async with engine.connect() as connection:
        sagas = (
            await connection.execute(
                select(
                    saga_instances.c.saga_id, saga_instances.c.status, saga_instances.c.started_at, saga_instances.c.updated_at
                )
            )
        ).all()
        durations = {}
        outcomes: Counter[str] = Counter()
        for row in sagas:
            outcomes[row.status] += 1
            durations[row.saga_id] = round((row.updated_at - row.started_at).total_seconds(), 6)
        wanted = {v.saga_id for v in violations if v.saga_id}
        if durations:
            wanted.add(max(sorted(durations), key=lambda k: durations[k]))
        history: dict[str, list[dict[str, Any]]] = {}
        if wanted:
            rows = (
                await connection.execute(
                    select(saga_history)
                    .where(saga_history.c.saga_id.in_(sorted(wanted)))
                    .order_by(saga_history.c.saga_id, saga_history.c.version)
                )
            ).all()
            origin = min(r.started_at for r in sagas)
            for r in rows:
                history.setdefault(r.saga_id, []).append(
                    {
                        "version": r.version,
                        "at_seconds": round((r.at - origin).total_seconds(), 6),
                        "trigger": r.trigger,
                        "from": r.from_status,
                        "to": r.to_status,
                        "step": r.step,
                        "note": r.note,
                        "sent": [s["type"] for s in json.loads(r.sent)],
                    }
                )
    return durations, dict(sorted(outcomes.items())), history


def dead_letter_record(queue: str, body: bytes, headers: Mapping[str, Any]) -> dict[str, str]:
    """One dead letter as the report lists it."""
    return {
        "queue": queue,
        "type": _type_of(body),
        "saga_id": str(headers.get(t.H_SAGA_ID, "")),
        "reason_class": str(headers.get(t.H_REASON_CLASS, "")),
        "reason": str(headers.get(t.H_REASON, "")),
        "attempts": str(headers.get(t.H_ATTEMPT, "")),
    }


def _type_of(body: bytes) -> str:
    try:
        return parse_envelope(body).type
    except Exception:  # noqa: BLE001 - only used to label a dead letter
        return "<undecodable>"


async def read_history_counts(engine: AsyncEngine) -> HistoryCounts:
    """What the coverage goals count in the saga histories, in one pass over them."""
    h = saga_history.c
    async with engine.connect() as connection:
        row = (
            await connection.execute(
                select(
                    func.count().filter(h.trigger.like("deadline:step:%")),
                    func.count().filter(h.note.like("late %")),
                    func.count(distinct(h.saga_id)).filter(h.to_status == "compensation_failed"),
                    func.count(distinct(h.saga_id)).filter(h.trigger == RETRY_TRIGGER),
                )
            )
        ).one()
    return HistoryCounts(
        step_deadlines=row[0], late_replies_undone=row[1], compensation_failed=row[2], compensation_failed_retried=row[3]
    )


async def read_saga_times(engine: AsyncEngine, workload: Any, origin: datetime) -> dict[str, SagaTimes]:
    """Per saga of the workload (`.orders`, each with `saga_id` and `at_seconds`): when its saga
    started, its status, when it first reached an outcome.

    Times are virtual seconds from `origin`; an order without a saga counts from when it was placed.
    """

    def seconds(at: datetime) -> float:
        at = at if at.tzinfo else at.replace(tzinfo=origin.tzinfo)
        return round((at - origin).total_seconds(), 6)

    h = saga_history.c
    async with engine.connect() as connection:
        sagas = {
            row.saga_id: row
            for row in await connection.execute(
                select(saga_instances.c.saga_id, saga_instances.c.status, saga_instances.c.started_at)
            )
        }
        ended = {
            row.saga_id: row.at
            for row in await connection.execute(
                select(h.saga_id, func.min(h.at).label("at")).where(h.to_status.in_(sorted(OUTCOMES))).group_by(h.saga_id)
            )
        }
    times = {}
    for order in workload.orders:
        saga = sagas.get(order.saga_id)
        if saga is None:
            times[order.saga_id] = SagaTimes(order.at_seconds, None, None)
            continue
        end = ended.get(order.saga_id)
        times[order.saga_id] = SagaTimes(seconds(saga.started_at), saga.status, seconds(end) if end is not None else None)
    return times
