"""The saga store on SQLite and on PostgreSQL: what one transition writes, and the deadline sweep.

A saga's single active deadline is four columns of its row, so a transition is one
read, one write of the saga row (INSERT for a start, UPDATE after) and its history row:
statements are counted with SQLAlchemy's `before_cursor_execute` event.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import delete, event, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts import ConflictError, Money, OrderCreated, OrderLine, Payload, StockLine, StockReserved, new_message
from infra.clock import VirtualClock
from outbox.tables import tables_for
from outbox.uow import UnitOfWork
from sagas.orchestrator import Orchestrator
from sagas.order_saga import ORDER_SAGA, STEP_DEADLINE
from sagas.state import Deadline, SagaStatus
from sagas.store import SagaStore, deadline_from_row, history_entry
from sagas.tables import saga_history, saga_instances

pytestmark = pytest.mark.integration

ORCHESTRATOR = Orchestrator([ORDER_SAGA])
SAGA_OUTBOX = tables_for("saga").outbox


@pytest.fixture
async def engine(migrated: AsyncEngine) -> AsyncEngine:
    """The database with no sagas (and no saga outbox rows) in it."""
    async with migrated.begin() as connection:
        for table in (saga_instances, saga_history, SAGA_OUTBOX):
            await connection.execute(delete(table))
    return migrated


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


def order(saga_id: str) -> OrderCreated:
    return OrderCreated(
        order_id=saga_id,
        customer_id="c-1",
        lines=(OrderLine(sku="sku-1", quantity=1, unit_price=100),),
        total=Money(amount=100, currency="EUR"),
        payment_token="tok_ok",
    )


def reserved(saga_id: str) -> StockReserved:
    return StockReserved(order_id=saga_id, lines=(StockLine(sku="sku-1", quantity=1),))


def shape(statement: str) -> str:
    """`SELECT saga_instances FOR UPDATE`, `UPDATE saga_instances`, `INSERT saga_history`: verb, table, lock.

    A statement with a data-modifying WITH is both shapes: `UPDATE saga_instances + INSERT saga_history`.
    """
    fused = re.match(r"WITH \w+ AS\s*\((.*?)\)\s*(INSERT INTO \w+.*)$", statement.strip(), re.DOTALL)
    if fused:
        return f"{shape(fused.group(1))} + {shape(fused.group(2))}"
    words = statement.split()
    verb = words[0].upper()
    if verb == "SELECT":
        table = words[[w.upper() for w in words].index("FROM") + 1]
        lock = " FOR UPDATE SKIP LOCKED" if "SKIP LOCKED" in statement else " FOR UPDATE" if "FOR UPDATE" in statement else ""
        return f"SELECT {table}{lock}"
    if verb in ("INSERT", "DELETE"):
        return f"{verb} {words[2]}"
    if verb == "UPDATE":
        return f"UPDATE {words[1]}"
    return verb


@contextmanager
def statements(engine: AsyncEngine) -> Iterator[list[str]]:
    """The shapes of the statements the engine runs inside the block (BEGIN left out)."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if not statement.lstrip().upper().startswith("BEGIN"):
            seen.append(shape(statement))

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)


def written(engine: AsyncEngine, saga_write: str) -> list[str]:
    """A transition's writes: its saga row and history row, one statement on PostgreSQL."""
    if engine.dialect.name == "sqlite":
        return [saga_write, "INSERT saga_history"]
    return [f"{saga_write} + INSERT saga_history"]


def locked(engine: AsyncEngine, shape: str) -> str:
    """SQLite has no row locks: SQLAlchemy leaves FOR UPDATE out there."""
    return shape.split(" FOR UPDATE")[0] if engine.dialect.name == "sqlite" else shape


async def deliver(engine: AsyncEngine, clock: VirtualClock, saga_id: str, payload: Payload) -> list[str]:
    """Apply one saga event in its own transaction; return the statements the orchestrator ran."""
    message = new_message(payload, correlation_id=saga_id, producer="test", occurred_at=clock.now())
    async with UnitOfWork(engine, "saga", clock, incoming=message) as uow:
        with statements(engine) as seen:
            await ORCHESTRATOR.handle(uow, message)
        await uow.commit()
    return seen


async def saga_row(engine: AsyncEngine, saga_id: str) -> Any:
    async with engine.connect() as connection:
        return (await connection.execute(select(saga_instances).where(saga_instances.c.saga_id == saga_id))).one()


async def transitions(engine: AsyncEngine, saga_id: str) -> list[str]:
    async with engine.connect() as connection:
        query = select(saga_history.c.trigger).where(saga_history.c.saga_id == saga_id).order_by(saga_history.c.version)
        return list((await connection.execute(query)).scalars())


async def test_a_start_and_a_reply_each_write_the_saga_row_once_and_one_history_row(
    engine: AsyncEngine, clock: VirtualClock
) -> None:
    started = await deliver(engine, clock, "s-1", order("s-1"))
    assert started == [locked(engine, "SELECT saga_instances FOR UPDATE"), *written(engine, "INSERT saga_instances")]
    row = await saga_row(engine, "s-1")
    assert deadline_from_row(row) == Deadline(due_at=clock.now() + STEP_DEADLINE, kind="step", step="reserve", attempt=1)

    clock.advance(1)
    advanced = await deliver(engine, clock, "s-1", reserved("s-1"))
    assert advanced == [locked(engine, "SELECT saga_instances FOR UPDATE"), *written(engine, "UPDATE saga_instances")]
    row = await saga_row(engine, "s-1")
    assert (row.version, row.status) == (2, "running")
    assert deadline_from_row(row) == Deadline(due_at=clock.now() + STEP_DEADLINE, kind="step", step="charge", attempt=1)


async def test_the_sweep_fires_a_due_deadline_from_the_row_it_claimed(engine: AsyncEngine, clock: VirtualClock) -> None:
    await deliver(engine, clock, "s-1", order("s-1"))
    await deliver(engine, clock, "s-2", order("s-2"))
    clock.advance(1)
    await deliver(engine, clock, "s-2", reserved("s-2"))  # due a second after s-1's

    clock.advance(STEP_DEADLINE.total_seconds() - 1)
    with statements(engine) as seen:
        assert await ORCHESTRATOR.sweep_deadlines(lambda: UnitOfWork(engine, "saga", clock)) == 1
    # One claim, the trace of the saga's newest message (the timeout continues the saga's
    # trace), then the saga row and its history row; the outbox row is the commands sent.
    assert seen == [
        locked(engine, "SELECT saga_instances FOR UPDATE SKIP LOCKED"),
        f"SELECT {SAGA_OUTBOX.name}",
        *written(engine, "UPDATE saga_instances"),
        f"INSERT {SAGA_OUTBOX.name}",
    ]
    row = await saga_row(engine, "s-1")
    assert (row.status, row.reason) == (SagaStatus.COMPENSATING.value, "deadline: reserve")
    assert deadline_from_row(row) == Deadline(
        due_at=clock.now() + ORDER_SAGA.compensation_deadline, kind="compensation", step="reserve", attempt=1
    )
    assert (await transitions(engine, "s-1"))[-1] == "deadline:step:reserve"
    assert (await saga_row(engine, "s-2")).status == SagaStatus.RUNNING.value  # not due yet

    clock.advance(1)
    assert await ORCHESTRATOR.sweep_deadlines(lambda: UnitOfWork(engine, "saga", clock)) == 1
    assert (await transitions(engine, "s-2"))[-1] == "deadline:step:charge"


async def test_a_stale_deadline_is_cleared_by_one_update_of_its_columns(engine: AsyncEngine, clock: VirtualClock) -> None:
    await deliver(engine, clock, "s-1", order("s-1"))
    async with engine.begin() as connection:  # a deadline for a step the saga is not at
        await connection.execute(update(saga_instances).where(saga_instances.c.saga_id == "s-1").values(deadline_step="commit"))
    before = await saga_row(engine, "s-1")

    clock.advance(STEP_DEADLINE.total_seconds())
    with statements(engine) as seen:
        assert await ORCHESTRATOR.sweep_deadlines(lambda: UnitOfWork(engine, "saga", clock)) == 1
    assert seen == [locked(engine, "SELECT saga_instances FOR UPDATE SKIP LOCKED"), "UPDATE saga_instances"]

    after = await saga_row(engine, "s-1")
    assert deadline_from_row(after) is None and after.deadline_kind is None and after.deadline_attempt is None
    # Nothing else moved: same version, state and history.
    no_deadline = dict.fromkeys(("deadline_at", "deadline_kind", "deadline_step", "deadline_attempt"))
    assert dict(after._mapping) | no_deadline == dict(before._mapping) | no_deadline
    assert await transitions(engine, "s-1") == ["order.created"]
    assert await ORCHESTRATOR.sweep_deadlines(lambda: UnitOfWork(engine, "saga", clock)) == 0


async def test_clearing_a_stale_deadline_never_clears_the_deadline_of_a_newer_version(
    engine: AsyncEngine, clock: VirtualClock
) -> None:
    await deliver(engine, clock, "s-1", order("s-1"))
    async with engine.connect() as connection:
        first = await SagaStore(connection).get("s-1", lock=False)
    assert first is not None and first.version == 1
    clock.advance(1)
    await deliver(engine, clock, "s-1", reserved("s-1"))  # version 2, with the charge deadline

    async with engine.begin() as connection:
        await SagaStore(connection).clear_deadline(first)
    row = await saga_row(engine, "s-1")
    assert (row.version, row.deadline_kind, row.deadline_step) == (2, "step", "charge")


@pytest.mark.parametrize("migrated", ["postgresql"], indirect=True)  # SQLite has no row locks
async def test_the_sweep_skips_a_saga_whose_row_a_reply_holds(engine: AsyncEngine, clock: VirtualClock) -> None:
    """The claim is the saga row's lock: a saga a reply holds waits for the next round, unwaited for."""
    await deliver(engine, clock, "held", order("held"))
    await deliver(engine, clock, "free", order("free"))
    clock.advance(STEP_DEADLINE.total_seconds())

    async with engine.connect() as holder:
        await holder.begin()
        assert await SagaStore(holder).get("held") is not None  # SELECT … FOR UPDATE, as a reply does
        assert await ORCHESTRATOR.sweep_deadlines(lambda: UnitOfWork(engine, "saga", clock), limit=10) == 1
        await holder.rollback()
    assert (await saga_row(engine, "free")).status == SagaStatus.COMPENSATING.value
    held = await saga_row(engine, "held")
    assert (held.status, held.deadline_kind) == (SagaStatus.RUNNING.value, "step")

    assert await ORCHESTRATOR.sweep_deadlines(lambda: UnitOfWork(engine, "saga", clock), limit=10) == 1
    assert (await saga_row(engine, "held")).status == SagaStatus.COMPENSATING.value


async def test_a_write_at_a_stale_version_is_a_conflict_and_records_no_history(engine: AsyncEngine, clock: VirtualClock) -> None:
    await deliver(engine, clock, "s-1", order("s-1"))
    async with engine.connect() as connection:
        store = SagaStore(connection)
        state = await store.get("s-1", lock=False)
        assert state is not None
        moved = replace(state, version=state.version + 1, updated_at=clock.now())
        entry = history_entry(
            moved, from_status=state.status, trigger="test", note="", step=None, message_id=None, causation_id=None, sent=()
        )
        with pytest.raises(ConflictError, match="changed concurrently"):
            await store.write(moved, None, entry, expected_version=state.version + 5)
        await connection.rollback()
    assert await transitions(engine, "s-1") == ["order.created"]
    assert (await saga_row(engine, "s-1")).version == state.version
