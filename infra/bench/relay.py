"""The outbox path: commit → outbox → relay → consume with the inbox, against the raw broker
(`limits.raw_pipelined_rate`), and the relay's memory over many rows."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aio_pika
from sqlalchemy import text

from contracts import new_message
from contracts.messages import LedgerUpdated
from infra import topology as t
from infra.bench.common import bench_saga, ledger_event, rss_mb
from infra.clock import SystemClock
from infra.db import create_engine
from infra.pipeline import BatchingConsumer, MessageProcessor
from infra.schema import upgrade
from infra.transport.rabbit import RabbitTransport
from outbox.dispatch import Dispatcher
from outbox.relay import Relay
from outbox.uow import UnitOfWork

BENCH_QUEUE = t.QueueSpec("bench.outbox", "ledger", t.EVENTS, (LedgerUpdated.message_type,))


async def outbox_rate(
    database_url: str,
    amqp_url: str,
    messages: int,
    writers: int = 20,
    prefetch: int = 100,
    batch: int = 50,
    precommitted: bool = False,
    dispatch: bool = False,
) -> dict[str, float]:
    """Commit to the outbox → relay → consume with the inbox, all running at once.

    With `dispatch`, the writers' commits are published at once by a dispatcher, as the
    services do (the relay running beside it finds nothing left). With `precommitted`,
    the rows are committed in bulk first and only relay → consume is timed: the
    pipeline without the producers' own commits.
    """
    engine = create_engine(database_url, pool_size=writers + 10)
    transport = RabbitTransport(amqp_url)
    await transport.connect()
    clock = SystemClock()
    try:
        await upgrade(engine)
        await _declare_bench_queue(transport)
        async with engine.begin() as c:
            await c.execute(text("TRUNCATE ledger_outbox, ledger_inbox"))
        done = asyncio.Event()
        processed = 0

        async def handle(_uow: UnitOfWork, _message: Any) -> None:
            nonlocal processed
            processed += 1
            if processed >= messages:
                done.set()

        processor = MessageProcessor(engine, "ledger", BENCH_QUEUE.name, {LedgerUpdated.message_type: handle}, clock)
        batching = BatchingConsumer(processor, max_batch=batch, workers=4)
        subscription = await transport.consume(BENCH_QUEUE, processor if batch <= 1 else batching, prefetch)
        stop = asyncio.Event()
        relay = Relay(engine, "ledger", transport, clock, batch_size=200, poll_seconds=0.05)
        from outbox.notify import listen_for_outbox

        relay_task = asyncio.create_task(relay.run(stop))
        listen_task = asyncio.create_task(listen_for_outbox(engine, {"ledger": relay}, stop))
        if precommitted:
            await _precommit(engine, messages, clock)
        counter = iter(range(0 if precommitted else messages))
        dispatcher = Dispatcher(engine, "ledger", transport, clock) if dispatch else None

        async def writer() -> None:
            for n in counter:
                async with UnitOfWork(engine, "ledger", clock, dispatcher=dispatcher) as uow:
                    uow.send(ledger_event(n), correlation_id=bench_saga(n))
                    await uow.commit()

        started = time.perf_counter()
        await asyncio.gather(*(writer() for _ in range(writers)))
        committed = time.perf_counter() - started
        await asyncio.wait_for(done.wait(), timeout=600)
        elapsed = time.perf_counter() - started
        stop.set()
        if dispatcher is not None:
            await dispatcher.close()
        await asyncio.gather(relay_task, listen_task)
        await subscription.stop(5)
        batching.close()
        return {
            "end_to_end_per_s": messages / elapsed,
            "outbox_commit_per_s": messages / committed if committed and not precommitted else 0.0,
        }
    finally:
        await transport.close()
        await engine.dispose()


async def _precommit(engine: Any, messages: int, clock: SystemClock) -> None:
    """Commit `messages` outbox rows in bulk, as if many business transactions had run."""
    from outbox.tables import tables_for
    from outbox.uow import outbox_row

    chunk = 5_000
    for start in range(0, messages, chunk):
        rows = [
            outbox_row(new_message(ledger_event(n), correlation_id=bench_saga(n), producer="bench"), clock.now())
            for n in range(start, min(messages, start + chunk))
        ]
        async with engine.begin() as c:
            await c.execute(tables_for("ledger").outbox.insert(), rows)


async def relay_memory(database_url: str, amqp_url: str, messages: int) -> dict[str, float]:
    """Relay `messages` pre-committed rows and sample the process's RSS as it goes."""
    engine = create_engine(database_url)
    transport = RabbitTransport(amqp_url)
    await transport.connect()
    clock = SystemClock()
    try:
        await upgrade(engine)
        await _declare_bench_queue(transport)
        async with engine.begin() as c:
            await c.execute(text("TRUNCATE ledger_outbox, ledger_inbox"))
        await _precommit(engine, messages, clock)
        # Drain the bench queue as fast as possible so the broker does not hold 100k messages.
        connection = await aio_pika.connect_robust(amqp_url)
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=500)
        queue = await channel.declare_queue(BENCH_QUEUE.name, passive=True)

        async def discard(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.ack()

        await queue.consume(discard)
        relay = Relay(engine, "ledger", transport, clock, batch_size=500)
        samples = [rss_mb()]
        started = time.perf_counter()
        published = 0
        while published < messages:
            count = await relay.relay_once()
            if count == 0:
                break
            published += count
            if published % 10_000 < count:
                samples.append(rss_mb())
        elapsed = time.perf_counter() - started
        samples.append(rss_mb())
        await connection.close()
        return {
            "messages": published,
            "relay_only_per_s": published / elapsed,
            "rss_start_mb": samples[0],
            "rss_after_10k_mb": samples[min(1, len(samples) - 1)],
            "rss_end_mb": samples[-1],
            "rss_max_mb": max(samples),
        }
    finally:
        await transport.close()
        await engine.dispose()


async def _declare_bench_queue(transport: RabbitTransport) -> None:
    await transport.declare_topology()
    channel = await transport.connection.channel()
    queue = await channel.declare_queue(BENCH_QUEUE.name, durable=True, arguments={"x-queue-type": "classic"})
    await queue.bind(t.EVENTS.name, routing_key=LedgerUpdated.message_type)
    await queue.purge()
    await channel.close()
