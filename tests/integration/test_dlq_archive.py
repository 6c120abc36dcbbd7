"""The dead-letter archive on the real RabbitMQ and PostgreSQL.

Poison messages (a bad payload, an undecodable body, a failing handler, a transient
failure past the maximum) end in `dead_letters` with their reasons; a dead letter
delivered twice is stored once; the archive process killed mid-stream loses nothing
and stores nothing twice.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest
from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts import ReserveStock, StockLine, TransientError, encode, new_message
from contracts.messages import PaymentAuthorized
from infra import topology as t
from infra.clock import SystemClock
from infra.dlq.archive import DeadLetterArchive, start_archive
from infra.dlq.tables import UNDECODABLE, dead_letters
from infra.pipeline import MessageProcessor, RetryPolicy
from infra.topology import STOCK_COMMANDS
from infra.transport.rabbit import RabbitTransport
from outbox.tables import tables_for
from tests.integration.dlq_support import COMPENSA, archived, publish_dead_letter, purge, stack_env
from tests.support import eventually

pytestmark = pytest.mark.integration

clock = SystemClock()
DLQS = [q.dlq for q in t.WORK_QUEUES]


@pytest.fixture(autouse=True)
async def empty(pg_engine: AsyncEngine, rabbit: RabbitTransport) -> None:
    async with pg_engine.begin() as connection:
        await connection.execute(delete(dead_letters))
        await connection.execute(delete(tables_for("stock").inbox))
    await purge(rabbit.connection, *DLQS)


@pytest.fixture
async def archive(pg_engine: AsyncEngine, amqp_url: str) -> AsyncIterator[DeadLetterArchive]:
    """The archive consuming every DLQ on a connection of its own."""
    transport = RabbitTransport(amqp_url)
    await transport.connect()
    handler, subscriptions = await start_archive(transport, pg_engine, clock, prefetch=20)
    try:
        yield handler
    finally:
        for subscription in subscriptions:
            await subscription.stop(grace_seconds=5)
        await transport.close()


def reservation(order_id: str, quantity: int = 1) -> Any:
    return new_message(ReserveStock(order_id=order_id, lines=(StockLine(sku="sku-1", quantity=quantity),)), correlation_id=order_id, producer="saga")


async def publish(channel: aio_pika.abc.AbstractChannel, body: bytes, message_id: str, correlation_id: str) -> None:
    await channel.default_exchange.publish(
        aio_pika.Message(body, message_id=message_id, correlation_id=correlation_id, type="stock.reserve",
                         content_type="application/json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
        routing_key=STOCK_COMMANDS.name,
    )


async def test_poison_messages_end_in_the_archive_with_their_reasons(
    pg_engine: AsyncEngine, rabbit: RabbitTransport, consume: Any, amqp_channel: aio_pika.abc.AbstractChannel,
    archive: DeadLetterArchive, retry_policy: RetryPolicy,
) -> None:
    async def handle(_uow: Any, message: Any) -> None:
        if message.payload.order_id.startswith("crash"):
            raise RuntimeError(f"handler bug on {message.payload.order_id}")
        if message.payload.order_id.startswith("flaky"):
            raise TransientError("gateway timeout")

    await consume(MessageProcessor(pg_engine, "stock", STOCK_COMMANDS.name, {"stock.reserve": handle}, clock, retry=retry_policy))
    crash, flaky, good = reservation("crash-1"), reservation("flaky-1"), reservation("good-1")
    bad_payload = reservation("bad-1").envelope.model_copy(update={"payload": {"order_id": "bad-1", "lines": []}})
    for message in (crash, flaky, good):
        await publish(amqp_channel, encode(message.envelope), str(message.message_id), message.correlation_id)
    await publish(amqp_channel, encode(bad_payload), str(bad_payload.message_id), "bad-1")
    await publish(amqp_channel, b"\x00\xffnot json at all", "raw-1", "raw-saga")

    rows = await eventually(lambda: _when_count(pg_engine, 4), timeout=20, message="four dead letters archived")
    by_saga = {row.saga_id: row for row in rows}

    assert set(by_saga) == {"crash-1", "flaky-1", "bad-1", "raw-saga"}
    assert (by_saga["crash-1"].reason_class, by_saga["crash-1"].reason) == ("handler_error", "RuntimeError: handler bug on crash-1")
    assert by_saga["crash-1"].attempts == 1 and by_saga["crash-1"].message_id == str(crash.message_id)
    assert by_saga["flaky-1"].reason_class == "transient_exhausted"
    assert by_saga["flaky-1"].attempts == retry_policy.max_attempts
    assert by_saga["flaky-1"].reason.startswith(f"gave up after {retry_policy.max_attempts} attempts")
    assert by_saga["flaky-1"].first_failure_at < by_saga["flaky-1"].last_failure_at
    assert by_saga["bad-1"].reason_class == "contract" and "lines" in by_saga["bad-1"].reason
    assert by_saga["bad-1"].type == "stock.reserve"
    assert by_saga["raw-saga"].type == UNDECODABLE and by_saga["raw-saga"].body_encoding == "base64"
    assert by_saga["raw-saga"].reason.startswith("body is not valid JSON")
    for row in rows:
        assert (row.queue, row.dlq, row.status) == ("stock.commands", "stock.commands.dlq", "new")
        assert (row.original_exchange, row.original_routing_key) == ("", "stock.commands")  # published straight to the queue
        assert json.loads(row.headers)[t.H_REASON_CLASS] == row.reason_class
    # Acknowledged only after commit, and acknowledged: nothing left in the DLQ.
    assert await _depth(rabbit, STOCK_COMMANDS.dlq) == 0


async def _when_count(engine: AsyncEngine, count: int) -> list[Any]:
    rows = await archived(engine)
    return rows if len(rows) >= count else []


async def _depth(transport: RabbitTransport, name: str) -> int:
    channel = await transport.connection.channel()
    try:
        queue = await channel.declare_queue(name, passive=True)
        return queue.declaration_result.message_count
    finally:
        await channel.close()


async def test_dead_letters_of_every_queue_are_archived_and_a_redelivered_one_is_stored_once(
    pg_engine: AsyncEngine, rabbit: RabbitTransport, amqp_channel: aio_pika.abc.AbstractChannel, archive: DeadLetterArchive,
) -> None:
    event = new_message(PaymentAuthorized(order_id="ord-7", payment_id="pay-7", amount={"amount": 100, "currency": "EUR"}),
                        correlation_id="ord-7", producer="payments")
    # The same dead letter twice, as after a crash between the archive's commit and its ack.
    for _ in range(2):
        await publish_dead_letter(amqp_channel, t.LEDGER_EVENTS, event, failed_at=clock.now().replace(microsecond=0))
    await publish_dead_letter(amqp_channel, t.SAGA_EVENTS, event, reason_class="business_rule", reason="late")

    await eventually(lambda: archive.archived + archive.duplicates >= 3, timeout=10)
    rows = await archived(pg_engine)

    assert archive.duplicates == 1
    assert sorted((r.queue, r.reason_class) for r in rows) == [("ledger.events", "handler_error"), ("saga.events", "business_rule")]
    assert {r.message_id for r in rows} == {str(event.message_id)}
    assert await _depth(rabbit, t.LEDGER_EVENTS.dlq) == 0


async def test_the_archive_process_killed_mid_stream_loses_nothing_and_stores_nothing_twice(
    pg_engine: AsyncEngine, amqp_url: str, rabbit: RabbitTransport, amqp_channel: aio_pika.abc.AbstractChannel,
) -> None:
    total = 3000
    sent = set()
    for n in range(total):
        message = reservation(f"kill-{n}")
        queue = t.WORK_QUEUES[n % len(t.WORK_QUEUES)]
        await publish_dead_letter(amqp_channel, queue, message)
        sent.add(str(message.message_id))
    env = stack_env(pg_engine, amqp_url, COMPENSA_PREFETCH="50")

    async def start() -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            COMPENSA, "run", "--service", "dlq", "--no-relay", env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )

    async def count() -> int:
        async with pg_engine.connect() as connection:
            return (await connection.execute(select(func.count()).select_from(dead_letters))).scalar_one()

    async def dlq_depth() -> int:
        return sum([await _depth(rabbit, name) for name in DLQS])

    first = await start()
    await eventually(lambda: _at_least(count, 200), timeout=30, interval=0.01, message="archive started")
    first.send_signal(signal.SIGKILL)  # mid-stream: committed-but-unacked and unacked deliveries in flight
    await first.wait()
    stored_before_restart = await count()
    assert stored_before_restart < total, "the archive finished before it could be killed; raise `total`"
    # Nothing lost: every message is either archived or back in a DLQ.
    await eventually(lambda: _at_least_sum(count, dlq_depth, total), timeout=15)

    second = await start()
    try:
        await eventually(lambda: _equals(count, total), timeout=60, message="all dead letters archived after the restart")
        await eventually(lambda: _equals(dlq_depth, 0), timeout=15, message="every DLQ acknowledged")
    finally:
        second.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(second.communicate(), 30)
    assert second.returncode == 0, stderr.decode()[-2000:]
    async with pg_engine.connect() as connection:
        ids = set((await connection.execute(select(dead_letters.c.message_id))).scalars())
    assert ids == sent


async def _at_least(measure: Any, value: int) -> bool:
    return await measure() >= value


async def _at_least_sum(a: Any, b: Any, value: int) -> bool:
    return await a() + await b() >= value


async def _equals(measure: Any, value: int) -> bool:
    return await measure() == value


async def test_the_archive_keeps_a_delivery_unacknowledged_until_its_row_commits(
    pg_engine: AsyncEngine, rabbit: RabbitTransport, amqp_channel: aio_pika.abc.AbstractChannel, amqp_url: str,
) -> None:
    """A database outage: nothing is acknowledged, and the row lands once the database is back."""
    failures = 3

    class FlakyArchive(DeadLetterArchive):
        async def store(self, rows: Any) -> set[str]:
            nonlocal failures
            if failures:
                failures -= 1
                raise ConnectionRefusedError("database down")
            return await super().store(rows)

    transport = RabbitTransport(amqp_url)
    await transport.connect()
    handler = FlakyArchive(pg_engine, clock, max_backoff_seconds=0.05)
    subscription = await transport.consume(t.DEAD_LETTER_QUEUES[1], handler, 5)
    try:
        await publish_dead_letter(amqp_channel, STOCK_COMMANDS, reservation("outage-1"))
        await eventually(lambda: handler.archived == 1, timeout=10)
    finally:
        await subscription.stop(5)
        await transport.close()
    assert failures == 0
    assert [r.saga_id for r in await archived(pg_engine)] == ["outage-1"]
    assert await _depth(rabbit, STOCK_COMMANDS.dlq) == 0

