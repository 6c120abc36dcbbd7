"""The outbox and inbox contract, run unchanged on SQLite and on PostgreSQL.

One parametrized ``engine`` fixture gives every test both backends, so the embedded
default and production keep the same behaviour: a message is written with its
business change or not at all, the inbox remembers a message per consumer, pruning
and the relay-lag summary see the right rows, and the relay publishes in commit order.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts import ContractError, Message, ReserveStock, StockLine, encode, new_message
from contracts.routing import COMMANDS_EXCHANGE
from infra.clock import VirtualClock
from infra.db import create_engine
from infra.schema import upgrade
from infra.topology import STOCK_COMMANDS
from infra.transport.memory import MemoryBroker
from outbox.relay import Relay
from outbox.tables import tables_for
from outbox.uow import UnitOfWork, pending_summary, prune

pytestmark = pytest.mark.integration

SERVICE = "stock"
TABLES = tables_for(SERVICE)
START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
async def sqlite_engine(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[AsyncEngine]:
    path: Path = tmp_path_factory.mktemp("outbox-contract") / "compensa.db"
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    await upgrade(engine)
    yield engine
    await engine.dispose()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest) -> AsyncEngine:
    """The same schema on SQLite (aiosqlite, a temp file) and on the real PostgreSQL."""
    return request.getfixturevalue({"sqlite": "sqlite_engine", "postgres": "pg_engine"}[request.param])


@pytest.fixture(autouse=True)
async def empty_tables(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        await connection.execute(delete(TABLES.outbox))
        await connection.execute(delete(TABLES.inbox))


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock(START)


def reserve(order_id: str) -> ReserveStock:
    return ReserveStock(order_id=order_id, lines=(StockLine(sku="sku-1", quantity=2),))


def incoming(order_id: str) -> Message[ReserveStock]:
    return new_message(reserve(order_id), correlation_id=order_id, producer="saga")


async def outbox_rows(engine: AsyncEngine) -> list:
    async with engine.connect() as connection:
        return (await connection.execute(select(TABLES.outbox).order_by(TABLES.outbox.c.id))).all()


async def inbox_rows(engine: AsyncEngine) -> list:
    async with engine.connect() as connection:
        query = select(TABLES.inbox).order_by(TABLES.inbox.c.consumer, TABLES.inbox.c.message_id)
        return (await connection.execute(query)).all()


async def send_and_commit(engine: AsyncEngine, clock: VirtualClock, *order_ids: str) -> list[Message]:
    async with UnitOfWork(engine, SERVICE, clock) as uow:
        sent = [uow.send(reserve(order_id), correlation_id=order_id) for order_id in order_ids]
        await uow.commit()
    return sent


# ------------------------------------------------------------------ writing


async def test_committed_send_writes_one_pending_row_holding_the_exact_message(engine: AsyncEngine, clock: VirtualClock) -> None:
    [message] = await send_and_commit(engine, clock, "order-1")

    [row] = await outbox_rows(engine)
    assert row.message_id == str(message.message_id)
    assert row.type == "stock.reserve"
    assert row.correlation_id == "order-1"
    assert row.exchange == COMMANDS_EXCHANGE
    assert row.routing_key == "stock.reserve"
    assert row.body == encode(message.envelope).decode()
    # Outside any span the outbox write starts the message's trace (its create span).
    assert message.envelope.traceparent is not None
    assert json.loads(row.headers) == {"traceparent": message.envelope.traceparent}
    assert row.created_at == START and row.created_at.tzinfo is UTC  # aware UTC on SQLite too
    assert row.sent_at is None
    assert message.envelope.producer == SERVICE


async def test_send_inside_a_span_carries_that_spans_traceparent_in_envelope_and_headers(
    engine: AsyncEngine, clock: VirtualClock, spans: InMemorySpanExporter
) -> None:
    with trace.get_tracer("tests.producer").start_as_current_span("produce") as span:
        [message] = await send_and_commit(engine, clock, "order-1")
    context = span.get_span_context()
    # The span that wrote the message is its creation context: no create span of its own.
    assert [s.name for s in spans.get_finished_spans()] == ["produce"]
    expected = f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"

    [row] = await outbox_rows(engine)
    assert message.envelope.traceparent == expected
    assert json.loads(row.headers) == {"traceparent": expected}
    assert json.loads(row.body)["traceparent"] == expected


async def test_leaving_the_unit_of_work_without_commit_writes_nothing(engine: AsyncEngine, clock: VirtualClock) -> None:
    async with UnitOfWork(engine, SERVICE, clock) as uow:
        uow.send(reserve("order-1"), correlation_id="order-1")
        await uow.flush_outbox()  # even rows already inserted go with the rollback

    assert await outbox_rows(engine) == []


async def test_an_exception_inside_the_unit_of_work_writes_nothing(engine: AsyncEngine, clock: VirtualClock) -> None:
    class BusinessFailure(Exception):
        pass

    with pytest.raises(BusinessFailure):
        async with UnitOfWork(engine, SERVICE, clock) as uow:
            uow.send(reserve("order-1"), correlation_id="order-1")
            await uow.flush_outbox()
            raise BusinessFailure("rule refused after the message was staged")

    assert await outbox_rows(engine) == []


# ------------------------------------------------------------------ inbox


async def test_inbox_seen_is_false_the_first_time_and_true_after_that(engine: AsyncEngine, clock: VirtualClock) -> None:
    message = incoming("order-1")
    async with UnitOfWork(engine, SERVICE, clock, incoming=message) as uow:
        assert await uow.seen("stock", message) is False
        await uow.commit()

    async with UnitOfWork(engine, SERVICE, clock, incoming=message) as uow:
        assert await uow.seen("stock", message) is True

    [row] = await inbox_rows(engine)
    assert (row.consumer, row.message_id, row.message_type) == ("stock", str(message.message_id), "stock.reserve")


async def test_a_message_id_reused_with_other_content_is_refused_not_skipped(engine: AsyncEngine, clock: VirtualClock) -> None:
    first = incoming("order-1")
    async with UnitOfWork(engine, SERVICE, clock, incoming=first) as uow:
        assert await uow.seen("stock", first) is False
        await uow.commit()
    resent = new_message(reserve("order-1"), correlation_id="order-1", producer="other", message_id=first.message_id)
    reused = new_message(reserve("order-2"), correlation_id="order-2", producer="saga", message_id=first.message_id)

    async with UnitOfWork(engine, SERVICE, clock, incoming=resent) as uow:
        assert await uow.seen("stock", resent) is True  # same content, sent again: a duplicate
        with pytest.raises(ContractError, match="already processed with other content"):
            await uow.seen("stock", reused)


async def test_inbox_keeps_messages_apart_per_consumer(engine: AsyncEngine, clock: VirtualClock) -> None:
    message = incoming("order-1")
    async with UnitOfWork(engine, SERVICE, clock, incoming=message) as uow:
        assert await uow.seen("stock", message) is False
        assert await uow.seen("stock-audit", message) is False
        assert await uow.seen("stock", message) is True
        await uow.commit()

    assert [row.consumer for row in await inbox_rows(engine)] == ["stock", "stock-audit"]


async def test_inbox_record_is_rolled_back_with_the_unit_of_work(engine: AsyncEngine, clock: VirtualClock) -> None:
    message = incoming("order-1")
    async with UnitOfWork(engine, SERVICE, clock, incoming=message) as uow:
        assert await uow.seen("stock", message) is False  # handler failed: no commit

    async with UnitOfWork(engine, SERVICE, clock, incoming=message) as uow:
        assert await uow.seen("stock", message) is False


# ------------------------------------------------------------------ housekeeping


async def test_prune_removes_only_old_sent_outbox_rows_and_old_inbox_rows(engine: AsyncEngine, clock: VirtualClock) -> None:
    old_sent, recent_sent, old_pending = await send_and_commit(engine, clock, "old", "recent", "pending")
    async with engine.begin() as connection:
        outbox = TABLES.outbox
        for message, sent_at in ((old_sent, START), (recent_sent, START + timedelta(hours=2))):
            await connection.execute(update(outbox).where(outbox.c.message_id == str(message.message_id)).values(sent_at=sent_at))
    old_seen, recent_seen = incoming("a"), incoming("b")
    for message, received_at in ((old_seen, START), (recent_seen, START + timedelta(hours=2))):
        clock.set(received_at)
        async with UnitOfWork(engine, SERVICE, clock, incoming=message) as uow:
            await uow.seen("stock", message)
            await uow.commit()

    removed = await prune(
        engine,
        SERVICE,
        now=START + timedelta(hours=3),
        outbox_age=timedelta(hours=2, minutes=30),
        inbox_age=timedelta(hours=2, minutes=30),
    )

    assert removed == (1, 1)
    kept = {row.message_id for row in await outbox_rows(engine)}
    assert kept == {str(recent_sent.message_id), str(old_pending.message_id)}
    assert [row.message_id for row in await inbox_rows(engine)] == [str(recent_seen.message_id)]


async def test_pending_summary_counts_pending_rows_and_ages_the_oldest(engine: AsyncEngine, clock: VirtualClock) -> None:
    assert await pending_summary(engine, SERVICE, START) == {
        "service": SERVICE,
        "pending": 0,
        "oldest_pending_age_seconds": 0.0,
    }
    first, _ = await send_and_commit(engine, clock, "order-1", "order-2")
    clock.advance(20)
    await send_and_commit(engine, clock, "order-3")
    async with engine.begin() as connection:  # a sent row is not pending
        outbox = TABLES.outbox
        await connection.execute(update(outbox).where(outbox.c.message_id == str(first.message_id)).values(sent_at=clock.now()))

    summary = await pending_summary(engine, SERVICE, START + timedelta(seconds=45))

    assert summary == {"service": SERVICE, "pending": 2, "oldest_pending_age_seconds": 45.0}


# ------------------------------------------------------------------ relay


async def test_relay_publishes_pending_rows_in_commit_order_and_marks_them_sent(engine: AsyncEngine, clock: VirtualClock) -> None:
    committed = []
    for order_ids in (("a-1", "b-1"), ("a-2",), ("c-1", "b-2")):
        committed += await send_and_commit(engine, clock, *order_ids)
        clock.advance(1)
    broker = MemoryBroker(clock)
    relay = Relay(engine, SERVICE, broker, clock, batch_size=2)

    assert await relay.relay_once() == 2
    assert [row.sent_at is not None for row in await outbox_rows(engine)] == [True, True, False, False, False]
    assert await relay.drain() == 3

    delivered = list(broker.queues[STOCK_COMMANDS.name])
    assert [m.message_id for m in delivered] == [str(m.message_id) for m in committed]
    assert [m.body for m in delivered] == [encode(m.envelope) for m in committed]
    rows = await outbox_rows(engine)
    assert all(row.sent_at == clock.now() and row.sent_at.tzinfo is UTC for row in rows)
    assert await relay.relay_once() == 0
    assert broker.stats.published == len(committed)


async def test_relay_sends_nothing_when_no_row_is_pending(engine: AsyncEngine, clock: VirtualClock) -> None:
    broker = MemoryBroker(clock)

    assert await Relay(engine, SERVICE, broker, clock).drain() == 0
    assert broker.stats.published == 0
