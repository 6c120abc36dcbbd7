"""Replay benchmark: archive N dead letters, replay them all, relay them; rates side by side.

Uses its own queue (`bench.replay` and `bench.replay.dlq`), never a work queue, and
removes its rows and queues at the end. The relay figure is the same `Relay` the
services run, draining the replayed rows from the `dlq` outbox to the broker with
confirms, so "replay / relay" says whether replaying keeps up with delivery.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import aio_pika
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from sqlalchemy import delete, func, select

from contracts import encode, new_message
from contracts.messages import LedgerUpdated
from infra import topology as t
from infra.bench.common import bench_saga, ledger_event
from infra.clock import SystemClock
from infra.db import create_engine
from infra.dlq.archive import DeadLetterArchive
from infra.dlq.replay import replay
from infra.dlq.tables import dead_letters
from infra.schema import upgrade
from infra.settings import Settings
from infra.transport.rabbit import RabbitTransport
from outbox.relay import Relay
from outbox.tables import tables_for

BENCH_QUEUE = t.QueueSpec("bench.replay", "ledger", t.EVENTS, (LedgerUpdated.message_type,))
BENCH_DLQ = t.QueueSpec(BENCH_QUEUE.dlq, "dlq", t.DLX, (BENCH_QUEUE.name,))


def _progress(console: Console | None, label: str) -> Progress:
    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=console,
    )


async def _cleanup(engine: Any) -> None:
    async with engine.begin() as connection:
        await connection.execute(delete(dead_letters).where(dead_letters.c.queue == BENCH_QUEUE.name))
        outbox = tables_for("dlq").outbox
        await connection.execute(delete(outbox).where(outbox.c.routing_key == BENCH_QUEUE.name))


async def replay_rate(
    database_url: str, amqp_url: str, messages: int, *, batch_size: int = 200, console: Console | None = None
) -> dict[str, float]:
    """Archive, replay and relay `messages` dead letters; return the three rates (msgs/s)."""
    settings = Settings(database_url=database_url, amqp_url=amqp_url)
    engine = create_engine(database_url, pool_size=20)
    transport = RabbitTransport(amqp_url)
    await transport.connect()
    clock = SystemClock()
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        await upgrade(engine)
        await transport.declare_topology()
        channel = await connection.channel(publisher_confirms=True)
        work = await channel.declare_queue(BENCH_QUEUE.name, durable=True)
        dlq = await channel.declare_queue(BENCH_DLQ.name, durable=True)
        await work.purge()
        await dlq.purge()
        await _cleanup(engine)

        # 1. N dead letters in the bench DLQ, as the consumer pipeline writes them.
        now = clock.now().isoformat()
        publishes = []
        for n in range(messages):
            message = new_message(ledger_event(n), correlation_id=bench_saga(n), producer="bench", message_id=uuid.uuid4())
            headers: dict[str, aio_pika.abc.FieldValue] = {
                t.H_REASON_CLASS: "handler_error",
                t.H_REASON: "RuntimeError: bench",
                t.H_ATTEMPT: 1,
                t.H_ORIGINAL_EXCHANGE: t.EVENTS.name,
                t.H_ORIGINAL_ROUTING_KEY: message.type,
                t.H_ORIGINAL_QUEUE: BENCH_QUEUE.name,
                t.H_FIRST_FAILURE: now,
                t.H_LAST_FAILURE: now,
                t.H_SAGA_ID: message.correlation_id,
            }
            publishes.append(
                channel.default_exchange.publish(
                    aio_pika.Message(
                        encode(message.envelope),
                        headers=headers,
                        message_id=str(message.message_id),
                        correlation_id=message.correlation_id,
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key=BENCH_DLQ.name,
                )
            )
            if len(publishes) >= 500:
                await asyncio.gather(*publishes)
                publishes.clear()
        await asyncio.gather(*publishes)

        # 2. The archive moves them into dead_letters (commit, then ack).
        archive = DeadLetterArchive(engine, clock)
        started = time.perf_counter()
        subscription = await transport.consume(BENCH_DLQ, archive, settings.prefetch)
        while archive.archived + archive.duplicates < messages:  # noqa: ASYNC110 - the archive's counters have no Event
            await asyncio.sleep(0.05)
        archive_s = time.perf_counter() - started
        await subscription.stop(5)

        # 3. Replay them all, with the progress bar the CLI shows.
        async with engine.connect() as c:
            ids = list(
                (
                    await c.execute(
                        select(dead_letters.c.id).where(dead_letters.c.queue == BENCH_QUEUE.name).order_by(dead_letters.c.id)
                    )
                ).scalars()
            )
        with _progress(console, "replaying") as progress:
            task = progress.add_task("replay", total=len(ids), rate="")
            started = time.perf_counter()

            def advance(count: int) -> None:
                progress.advance(task, count)
                progress.update(task, rate=f"{progress.tasks[task].completed / (time.perf_counter() - started):,.0f}/s")

            summary = await replay(
                engine, clock, ids, batch_size=batch_size, queues={BENCH_QUEUE.name: BENCH_QUEUE}, on_progress=advance
            )
            replay_s = time.perf_counter() - started
        if summary.replayed != messages:
            raise RuntimeError(f"replayed {summary.replayed} of {messages}: {summary.outcomes[:3]}")

        # 4. The relay drains the dlq outbox to the bench queue, which a consumer empties.
        delivered = 0

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal delivered
            await message.ack()
            delivered += 1

        consume_channel = await connection.channel()
        await consume_channel.set_qos(prefetch_count=500)
        bench_queue = await consume_channel.get_queue(BENCH_QUEUE.name)
        consumer = await bench_queue.consume(on_message)
        relay = Relay(engine, "dlq", transport, clock, batch_size=settings.relay_batch_size)
        with _progress(console, "relaying ") as progress:
            task = progress.add_task("relay", total=messages, rate="")
            started = time.perf_counter()
            relayed = 0
            while relayed < messages:
                count = await relay.relay_once()
                if count == 0 and relay.last_claimed == 0:
                    break
                relayed += count
                progress.update(task, completed=relayed, rate=f"{relayed / (time.perf_counter() - started):,.0f}/s")
            relay_s = time.perf_counter() - started
        deadline = time.perf_counter() + 60
        while delivered < messages and time.perf_counter() < deadline:  # noqa: ASYNC110 - a counter, with a deadline
            await asyncio.sleep(0.05)
        await bench_queue.cancel(consumer)
        async with engine.connect() as c:
            replayed_rows = (
                await c.execute(
                    select(func.count())
                    .select_from(dead_letters)
                    .where(dead_letters.c.queue == BENCH_QUEUE.name, dead_letters.c.status == "replayed")
                )
            ).scalar_one()
        return {
            "archive_per_s": messages / archive_s,
            "replay_per_s": messages / replay_s,
            "relay_per_s": relayed / relay_s,
            "delivered": float(delivered),
            "replayed_rows": float(replayed_rows),
        }
    finally:
        try:
            channel = await connection.channel()
            await channel.queue_delete(BENCH_QUEUE.name)
            await channel.queue_delete(BENCH_DLQ.name)
            await _cleanup(engine)
        finally:
            await connection.close()
            await transport.close()
            await engine.dispose()
