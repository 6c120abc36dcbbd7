"""What the orchestrator does after a transition: observers (the saga metrics) see it once it is
committed, and only then; a deadline that fires continues its saga's trace."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts import Money, OrderCreated, OrderLine, new_message
from infra.clock import VirtualClock
from infra.db import create_engine
from outbox.tables import metadata, tables_for
from outbox.uow import UnitOfWork
from sagas.orchestrator import AppliedTransition, Orchestrator
from sagas.order_saga import ORDER_SAGA
from sagas.tables import metadata as saga_metadata


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'observers.db'}")
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
        await connection.run_sync(saga_metadata.create_all)
    yield engine
    await engine.dispose()


def placed(order_id: str) -> object:
    order = OrderCreated(
        order_id=order_id,
        customer_id="c-1",
        lines=(OrderLine(sku="sku-1", quantity=1, unit_price=100),),
        total=Money(amount=100, currency="EUR"),
        payment_token="tok_ok",
    )
    return new_message(order, correlation_id=order_id, producer="test")


async def test_a_rolled_back_transition_is_not_observed_and_a_committed_one_once(engine: AsyncEngine) -> None:
    seen: list[AppliedTransition] = []
    orchestrator = Orchestrator([ORDER_SAGA], observers=[seen.append])
    clock = VirtualClock()
    message = placed("o-1")

    # A batch that fails after this message's transition rolls it back: nothing happened.
    async with UnitOfWork(engine, "saga", clock, incoming=message) as uow:
        await orchestrator.handle(uow, message)
        assert seen == []  # not before the commit either
    assert seen == []

    # The same message processed again, alone, and committed: observed once.
    async with UnitOfWork(engine, "saga", clock, incoming=message) as uow:
        await orchestrator.handle(uow, message)
        await uow.commit()
    assert [(t.before, t.after.saga_id, t.trigger) for t in seen] == [(None, "o-1", seen[0].trigger)]
    assert seen[0].after.version == 1


async def test_an_observer_that_raises_spoils_neither_the_commit_nor_the_other_observers(engine: AsyncEngine) -> None:
    seen: list[str] = []

    def broken(_: AppliedTransition) -> None:
        raise RuntimeError("observer bug")

    orchestrator = Orchestrator([ORDER_SAGA], observers=[broken, lambda t: seen.append(t.after.saga_id)])
    message = placed("o-2")
    async with UnitOfWork(engine, "saga", VirtualClock(), incoming=message) as uow:
        await orchestrator.handle(uow, message)
        await uow.commit()
    assert seen == ["o-2"]
    assert uow.committed


SAGA_OUTBOX = tables_for("saga").outbox


async def traces_of_saga_messages(engine: AsyncEngine) -> list[tuple[str, str]]:
    async with engine.connect() as connection:
        rows = (await connection.execute(select(SAGA_OUTBOX.c.type, SAGA_OUTBOX.c.body).order_by(SAGA_OUTBOX.c.id))).all()
    return [(row.type, json.loads(row.body)["traceparent"].split("-")[1]) for row in rows]


async def test_a_fired_deadline_and_what_it_sends_stay_in_the_saga_trace(
    engine: AsyncEngine, spans: InMemorySpanExporter
) -> None:
    orchestrator = Orchestrator([ORDER_SAGA])
    clock = VirtualClock()
    order = OrderCreated(
        order_id="o-late",
        customer_id="c-1",
        lines=(OrderLine(sku="sku-1", quantity=1, unit_price=100),),
        total=Money(amount=100, currency="EUR"),
        payment_token="tok_ok",
    )
    with trace.get_tracer("test").start_as_current_span("order.place") as root:
        saga_trace = format(root.get_span_context().trace_id, "032x")
        message = new_message(order, correlation_id="o-late", producer="test")
        async with UnitOfWork(engine, "saga", clock, incoming=message) as uow:
            await orchestrator.handle(uow, message)
            await uow.commit()
    spans.clear()

    # Nobody answers; the sweep runs later, outside any trace, as the sweeper does.
    clock.advance(timedelta(hours=1).total_seconds())
    assert await orchestrator.sweep_deadlines(lambda: UnitOfWork(engine, "saga", clock)) == 1

    finished = {span.name: span for span in spans.get_finished_spans()}
    fired, sweep = finished["saga.deadline"], finished["saga.fire_deadlines"]
    assert format(fired.context.trace_id, "032x") == saga_trace
    assert [link.context.span_id for link in fired.links] == [sweep.context.span_id]
    sent = await traces_of_saga_messages(engine)
    assert len(sent) >= 2, sent  # the first command, then what the timeout sent
    assert {trace_id for _, trace_id in sent} == {saga_trace}
