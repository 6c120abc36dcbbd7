"""The machine's limits for the saga's work: raw RabbitMQ publish-with-confirm and
consume rates, and PostgreSQL commits/s of the saga's transaction shape."""

from __future__ import annotations

import asyncio
import time
import uuid

import aio_pika
from sqlalchemy import text

from contracts import new_message
from infra.bench.common import bench_saga, ledger_event
from infra.db import create_engine


async def _raw_run(amqp_url: str, messages: int, inflight: int, *, pipelined: bool) -> dict[str, float]:
    """Publish persistent messages with confirms (`inflight` at once) to a fresh queue and
    consume them with acks, either after publishing (`pipelined=False`) or meanwhile."""
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        publish_channel = await connection.channel(publisher_confirms=True)
        consume_channel = await connection.channel()
        await consume_channel.set_qos(prefetch_count=inflight)
        queue = await consume_channel.declare_queue(f"bench.raw.{uuid.uuid4().hex[:8]}", durable=True)
        body = new_message(ledger_event(0), correlation_id=bench_saga(0), producer="bench").envelope.model_dump_json().encode()
        received = 0
        done = asyncio.Event()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal received
            await message.ack()
            received += 1
            if received >= messages:
                done.set()

        semaphore = asyncio.Semaphore(inflight)

        async def publish(n: int) -> None:
            async with semaphore:
                await publish_channel.default_exchange.publish(
                    aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=str(n)),
                    routing_key=queue.name,
                )

        tag = await queue.consume(on_message) if pipelined else None
        started = time.perf_counter()
        await asyncio.gather(*(publish(n) for n in range(messages)))
        published = time.perf_counter() - started
        consume_started = time.perf_counter()
        if tag is None:
            tag = await queue.consume(on_message)
        await asyncio.wait_for(done.wait(), timeout=600)
        finished = time.perf_counter()
        await queue.cancel(tag)
        await queue.delete(if_unused=False, if_empty=False)
        return {
            "publish_confirm_per_s": messages / published,
            "consume_ack_per_s": messages / (finished - consume_started),
            "end_to_end_per_s": messages / (finished - started),
        }
    finally:
        await connection.close()


async def raw_broker_rate(amqp_url: str, messages: int, inflight: int = 100) -> dict[str, float]:
    """Persistent publish-with-confirm, then consume-with-ack of the same messages, apart."""
    return await _raw_run(amqp_url, messages, inflight, pipelined=False)


async def raw_pipelined_rate(amqp_url: str, messages: int, inflight: int = 100) -> float:
    """Publish-with-confirm and consume at the same time: the raw path the outbox is compared to."""
    return (await _raw_run(amqp_url, messages, inflight, pipelined=True))["end_to_end_per_s"]


async def postgres_commit_rate(database_url: str, seconds: float = 3.0, concurrency: int = 20) -> float:
    """Commits/s of the saga's transaction shape: inbox insert + row update + outbox insert."""
    engine = create_engine(database_url, pool_size=concurrency)
    try:
        async with engine.begin() as c:
            await c.execute(text("CREATE UNLOGGED TABLE IF NOT EXISTS bench_rows (id int primary key, n bigint)"))
            await c.execute(text("CREATE TABLE IF NOT EXISTS bench_inbox (id uuid primary key)"))
            await c.execute(text("CREATE TABLE IF NOT EXISTS bench_outbox (id bigserial primary key, body text)"))
            await c.execute(text("TRUNCATE bench_rows, bench_inbox, bench_outbox"))
            await c.execute(text("INSERT INTO bench_rows SELECT g, 0 FROM generate_series(1, 1000) g"))
        deadline = time.perf_counter() + seconds
        commits = 0

        async def worker(w: int) -> None:
            nonlocal commits
            n = 0
            while time.perf_counter() < deadline:
                async with engine.begin() as c:
                    await c.execute(text("INSERT INTO bench_inbox VALUES (:id)"), {"id": uuid.uuid4()})
                    await c.execute(text("UPDATE bench_rows SET n = n + 1 WHERE id = :id"), {"id": (w * 50 + n) % 1000 + 1})
                    await c.execute(text("INSERT INTO bench_outbox (body) VALUES (:b)"), {"b": "x" * 400})
                commits += 1
                n += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        rate = commits / (time.perf_counter() - started)
        async with engine.begin() as c:
            await c.execute(text("DROP TABLE bench_rows, bench_inbox, bench_outbox"))
        return rate
    finally:
        await engine.dispose()
