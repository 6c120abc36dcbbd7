"""CPU per consumed message: a FastStream subscriber with compensa's decoding (producers.sdk.faststream)
against raw aio-pika doing the same decoding, on the same broker, run alternately."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import aio_pika

from contracts import ContractError, decode, encode, new_message
from contracts.routing import EVENTS_EXCHANGE
from infra.bench.common import bench_saga, ledger_event


async def _fill(channel: aio_pika.abc.AbstractChannel, queue: str, messages: int) -> None:
    """Declare `queue` as `subscribe` does and put `messages` valid ledger.updated events in it."""
    arguments: dict[str, Any] = {
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": f"{queue}.dlq",
        "x-queue-type": "classic",
    }
    await channel.declare_queue(queue, durable=True, arguments=arguments)
    for n in range(messages):
        envelope = new_message(ledger_event(n), correlation_id=bench_saga(n), producer="bench").envelope
        await channel.default_exchange.publish(
            aio_pika.Message(
                encode(envelope),
                message_id=str(envelope.message_id),
                type=envelope.type,
                correlation_id=envelope.correlation_id,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=queue,
        )


async def _raw(amqp_url: str, queue: str, messages: int, prefetch: int) -> float:
    """CPU seconds to consume `messages` with aio-pika: decode, check the message-id, ack."""
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        amqp_queue = await channel.get_queue(queue)
        received = 0
        done = asyncio.Event()

        async def on_message(incoming: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal received
            message = decode(incoming.body)
            if incoming.message_id != str(message.message_id):
                raise ContractError("message-id mismatch")
            await incoming.ack()
            received += 1
            if received >= messages:
                done.set()

        started = time.process_time()
        tag = await amqp_queue.consume(on_message)
        await asyncio.wait_for(done.wait(), timeout=600)
        cpu = time.process_time() - started
        await amqp_queue.cancel(tag)
        return cpu
    finally:
        await connection.close()


async def _faststream(amqp_url: str, queue: str, messages: int, prefetch: int) -> float:
    """CPU seconds to consume `messages` with a FastStream subscriber from `producers.sdk.faststream`."""
    from faststream.rabbit import Channel, RabbitBroker

    from producers.sdk.faststream import events_router, subscribe

    broker = RabbitBroker(amqp_url, default_channel=Channel(prefetch_count=prefetch), logger=None)
    router = events_router()
    received = 0
    done = asyncio.Event()

    @subscribe(router, queue, "ledger.updated")
    async def on_event(event: Any) -> None:
        nonlocal received
        received += 1
        if received >= messages:
            done.set()

    broker.include_router(router)
    started = time.process_time()
    await broker.start()
    try:
        await asyncio.wait_for(done.wait(), timeout=600)
        return time.process_time() - started
    finally:
        await broker.stop()


async def consume_cpu(amqp_url: str, messages: int, rounds: int = 2, prefetch: int = 100) -> dict[str, float]:
    """Microseconds of this process's CPU per consumed message, raw aio-pika and FastStream, alternated."""
    connection = await aio_pika.connect_robust(amqp_url)
    costs: dict[str, list[float]] = {"raw_aio_pika_us": [], "faststream_us": []}
    try:
        channel = await connection.channel(publisher_confirms=True)
        # FastStream's subscriber checks that compensa's exchange exists (it binds the queue to it).
        await channel.declare_exchange(EVENTS_EXCHANGE, type=aio_pika.ExchangeType.TOPIC, durable=True)
        for _ in range(rounds):
            for label, run in (("raw_aio_pika_us", _raw), ("faststream_us", _faststream)):
                queue = f"bench.faststream.{uuid.uuid4().hex[:8]}"
                await _fill(channel, queue, messages)
                costs[label].append(await run(amqp_url, queue, messages, prefetch) / messages * 1e6)
                await channel.queue_delete(queue)
                await channel.queue_delete(f"{queue}.dlq")
    finally:
        await connection.close()
    result = {label: min(values) for label, values in costs.items()}
    result["ratio"] = result["faststream_us"] / result["raw_aio_pika_us"]
    return result
