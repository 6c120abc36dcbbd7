"""The consumer pipeline on the real RabbitMQ and PostgreSQL.

Malformed messages go straight to ``stock.commands.dlq`` with a reason while good ones
keep flowing; transient failures come back through the delay queues with an attempt
header and end in the DLQ past the maximum; permanent handler failures are not
retried; two consumers sharing a queue apply each effect once.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import datetime
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
import pytest
from pamqp import body as amqp_body
from pamqp import commands as amqp
from pamqp import exceptions as amqp_exceptions
from pamqp import frame as amqp_frame
from pamqp import header as amqp_header
from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts import (
    BusinessRuleError,
    CommitStock,
    Envelope,
    Message,
    ReserveStock,
    StockLine,
    TransientError,
    encode,
    new_message,
)
from contracts.routing import COMMANDS_EXCHANGE
from infra import topology as t
from infra.clock import SystemClock
from infra.pipeline import BatchingConsumer, MessageProcessor, RetryPolicy
from infra.topology import STOCK_COMMANDS
from infra.transport.base import Delivery
from infra.transport.rabbit import RabbitTransport
from outbox.ports import OutgoingMessage
from outbox.tables import tables_for
from outbox.uow import UnitOfWork
from tests.integration.support import applied_rows, effects, record_reservation
from tests.support import eventually

pytestmark = pytest.mark.integration

SERVICE = CONSUMER = "stock"
clock = SystemClock()

#: The delivery being processed, for handlers that want to see its headers.
delivery_in_process: ContextVar[Delivery] = ContextVar("delivery_in_process")


@pytest.fixture(autouse=True)
async def empty_tables(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        await connection.execute(delete(tables_for(CONSUMER).inbox))
        await connection.execute(delete(effects))


# ------------------------------------------------------------------ helpers


def processor_for(engine: AsyncEngine, handler: Any, retry: RetryPolicy) -> MessageProcessor:
    return MessageProcessor(engine, SERVICE, CONSUMER, {"stock.reserve": handler}, clock, retry=retry)


def exposing_delivery(processor: MessageProcessor) -> Any:
    """Run the processor with the current delivery visible to the handler."""

    async def on_delivery(delivery: Delivery) -> None:
        delivery_in_process.set(delivery)
        await processor(delivery)

    return on_delivery


def reservation(order_id: str) -> Message[ReserveStock]:
    payload = ReserveStock(order_id=order_id, lines=(StockLine(sku="sku-1", quantity=1),))
    return new_message(payload, correlation_id=order_id, producer="saga")


def outgoing(message: Message[Any]) -> OutgoingMessage:
    """The message as the relay would hand it to the publisher."""
    envelope: Envelope = message.envelope
    return OutgoingMessage(
        message_id=str(envelope.message_id),
        type=envelope.type,
        correlation_id=envelope.correlation_id,
        exchange=COMMANDS_EXCHANGE,
        routing_key=envelope.type,
        body=encode(envelope),
    )


async def applied_ids(engine: AsyncEngine) -> list[str]:
    return [row.message_id for row in await applied_rows(engine)]


async def inbox_count(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        inbox = tables_for(CONSUMER).inbox
        return (await connection.execute(select(func.count()).select_from(inbox))).scalar_one()


async def publish_raw(
    channel: aio_pika.abc.AbstractChannel,
    body: bytes,
    *,
    case: str,
    message_id: str | None,
    correlation_id: str,
    type_: str = "stock.reserve",
) -> None:
    """Publish straight to the work queue through the default exchange, confirmed."""
    message = aio_pika.Message(
        body,
        message_id=message_id,
        correlation_id=correlation_id,
        type=type_,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        headers={"x-test-case": case},
    )
    await channel.default_exchange.publish(message, routing_key=STOCK_COMMANDS.name)


async def publish_without_message_id(amqp_url: str, body: bytes, *, case: str, correlation_id: str) -> None:
    """Publish through a bare AMQP 0-9-1 client: aio-pika always fills in a message-id."""
    url = urlsplit(amqp_url)
    vhost = unquote(url.path[1:]) if len(url.path) > 1 else "/"
    reader, writer = await asyncio.open_connection(url.hostname, url.port or 5672)
    received = b""

    async def expect(kind: type) -> Any:
        nonlocal received
        while True:
            try:
                used, _channel, value = amqp_frame.unmarshal(received)
            except amqp_exceptions.UnmarshalingException:  # not a whole frame yet
                chunk = await asyncio.wait_for(reader.read(65536), timeout=10)
                if not chunk:
                    raise ConnectionError(f"broker closed the connection waiting for {kind.__name__}") from None
                received += chunk
                continue
            received = received[used:]
            if isinstance(value, kind):
                return value
            if isinstance(value, amqp.Connection.Close | amqp.Channel.Close):
                raise ConnectionError(f"broker closed: {value.reply_text}")

    def send(value: Any, channel: int = 0) -> None:
        writer.write(amqp_frame.marshal(value, channel))

    try:
        writer.write(amqp_header.ProtocolHeader().marshal())
        await expect(amqp.Connection.Start)
        send(
            amqp.Connection.StartOk(
                mechanism="PLAIN", response=f"\0{unquote(url.username or 'guest')}\0{unquote(url.password or 'guest')}"
            )
        )
        tune = await expect(amqp.Connection.Tune)
        send(amqp.Connection.TuneOk(tune.channel_max, tune.frame_max, 0))
        send(amqp.Connection.Open(virtual_host=vhost))
        await expect(amqp.Connection.OpenOk)
        send(amqp.Channel.Open(), 1)
        await expect(amqp.Channel.OpenOk)
        send(amqp.Confirm.Select(), 1)
        await expect(amqp.Confirm.SelectOk)
        properties = amqp.Basic.Properties(
            content_type="application/json",
            delivery_mode=2,
            correlation_id=correlation_id,
            message_type="stock.reserve",
            headers={"x-test-case": case},
        )
        send(amqp.Basic.Publish(exchange="", routing_key=STOCK_COMMANDS.name), 1)
        send(amqp_header.ContentHeader(0, len(body), properties), 1)
        send(amqp_body.ContentBody(body), 1)
        await expect(amqp.Basic.Ack)
        send(amqp.Connection.Close(reply_code=200, reply_text="bye", class_id=0, method_id=0))
        await expect(amqp.Connection.CloseOk)
    finally:
        writer.close()


async def take_all(channel: aio_pika.abc.AbstractChannel, name: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    queue = await channel.get_queue(name)
    taken = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        taken.append(message)
    return taken


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def failure_headers_are_well_formed(headers: Mapping[str, Any]) -> None:
    first = datetime.fromisoformat(text(headers[t.H_FIRST_FAILURE]))
    last = datetime.fromisoformat(text(headers[t.H_LAST_FAILURE]))
    assert first.tzinfo is not None and first <= last
    assert text(headers[t.H_ORIGINAL_QUEUE]) == STOCK_COMMANDS.name


class FlakyParticipant:
    """Fail with a transient error on the first `failures` deliveries of each message."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: Counter[uuid.UUID] = Counter()
        self.call_times: list[float] = []
        self.succeeded_on: Delivery | None = None

    async def __call__(self, uow: UnitOfWork, message: Message[ReserveStock]) -> None:
        self.calls[message.message_id] += 1
        self.call_times.append(time.monotonic())
        if self.calls[message.message_id] <= self.failures:
            raise TransientError("could not obtain lock on row in relation stock_levels")
        await record_reservation(uow, message)
        self.succeeded_on = delivery_in_process.get()


# ------------------------------------------------------------------ contract defects


async def test_malformed_messages_are_dead_lettered_with_their_defect_while_good_ones_flow(
    engine: AsyncEngine,
    rabbit: RabbitTransport,
    amqp_channel: aio_pika.abc.AbstractChannel,
    amqp_url: str,
    consume: Any,
    depth: Any,
    retry_policy: RetryPolicy,
) -> None:
    def envelope_with(**changes: Any) -> bytes:
        raw = json.loads(encode(reservation("order-x").envelope))
        raw.update(changes)
        return json.dumps(raw).encode()

    valid = reservation("order-bad")
    unhandled = new_message(CommitStock(order_id="order-bad"), correlation_id="order-bad", producer="saga")
    # case -> (body, AMQP message-id, what the reason must name)
    defects: dict[str, tuple[bytes, str | None, str]] = {
        "invalid-json": (b'{"message_id": "oops', str(uuid.uuid4()), "not valid JSON"),
        "not-an-object": (b"[1, 2, 3]", str(uuid.uuid4()), "must be a JSON object"),
        "invalid-envelope": (envelope_with(producer=None), str(uuid.uuid4()), "producer"),
        "unknown-type": (envelope_with(type="stock.teleport"), str(uuid.uuid4()), "unknown message type 'stock.teleport'"),
        "unknown-version": (envelope_with(version=7), str(uuid.uuid4()), "unknown version 7 of 'stock.reserve'"),
        "invalid-payload": (
            envelope_with(payload={"order_id": "order-x", "lines": []}),
            str(uuid.uuid4()),
            "invalid payload for stock.reserve v1: lines",
        ),
        "mismatched-message-id": (encode(valid.envelope), str(uuid.uuid4()), f"!= envelope message_id {valid.message_id}"),
        "unhandled-type": (encode(unhandled.envelope), str(unhandled.message_id), "no handler for 'stock.commit'"),
    }
    good = [reservation(f"order-good-{n}") for n in range(4)]
    processor = processor_for(engine, record_reservation, retry_policy)
    await consume(processor, prefetch=5)

    async def publish_good(message: Message[ReserveStock]) -> None:
        await publish_raw(
            amqp_channel,
            encode(message.envelope),
            case="good",
            message_id=str(message.message_id),
            correlation_id=message.correlation_id,
        )

    await publish_good(good[0])
    for n, (case, (body, message_id, _)) in enumerate(defects.items()):
        await publish_raw(amqp_channel, body, case=case, message_id=message_id, correlation_id=f"saga-{case}")
        if n == 3:
            await publish_good(good[1])
    await publish_without_message_id(
        amqp_url, encode(valid.envelope), case="missing-message-id", correlation_id="saga-missing-message-id"
    )
    defects["missing-message-id"] = (encode(valid.envelope), None, "AMQP message-id property is missing")
    await publish_good(good[2])
    await publish_good(good[3])

    async def all_settled() -> bool:
        return processor.processed == len(good) and await depth(STOCK_COMMANDS.dlq) == len(defects)

    await eventually(all_settled, message="good messages applied and defects dead-lettered")
    assert sorted(await applied_ids(engine)) == sorted(str(m.message_id) for m in good)
    dead = {text(m.headers["x-test-case"]): m for m in await take_all(amqp_channel, STOCK_COMMANDS.dlq)}
    assert set(dead) == set(defects)
    for case, (body, message_id, names_the_defect) in defects.items():
        letter = dead[case]
        headers = letter.headers
        assert text(headers[t.H_REASON_CLASS]) == "contract", case
        assert names_the_defect in text(headers[t.H_REASON]), (case, headers[t.H_REASON])
        assert headers[t.H_ATTEMPT] == 1, case
        assert text(headers[t.H_SAGA_ID]) == f"saga-{case}", case
        failure_headers_are_well_formed(headers)
        assert letter.body == body, case
        if message_id is not None:  # aiormq gives any publish without an id a random one
            assert letter.message_id == message_id, case
    assert await depth(STOCK_COMMANDS.name) == 0


# ------------------------------------------------------------------ handler failures


async def test_transient_failures_retry_through_the_delay_queues_then_apply_once(
    engine: AsyncEngine, rabbit: RabbitTransport, consume: Any, depth: Any, retry_policy: RetryPolicy
) -> None:
    failures = retry_policy.max_attempts - 2
    participant = FlakyParticipant(failures)
    processor = processor_for(engine, participant, retry_policy)
    await consume(exposing_delivery(processor))
    message = reservation("order-1")

    await rabbit.publish_batch([outgoing(message)])

    await eventually(lambda: processor.processed == 1)
    assert participant.calls[message.message_id] == failures + 1
    delivery = participant.succeeded_on
    assert delivery is not None
    assert delivery.attempt == failures + 1
    assert delivery.headers[t.H_ATTEMPT] == failures + 1
    assert text(delivery.headers[t.H_REASON_CLASS]) == "transient"
    assert "could not obtain lock" in text(delivery.headers[t.H_REASON])
    failure_headers_are_well_formed(delivery.headers)
    # The broker itself moved the message back out of a delay queue (x-death).
    died_in = {text(death["queue"]) for death in delivery.headers["x-death"]}
    delay_queues = {STOCK_COMMANDS.delay_queue(ms) for ms in map(retry_policy.delay_ms, range(1, failures + 1))}
    assert STOCK_COMMANDS.delay_queue(retry_policy.delay_ms(failures)) in died_in
    assert died_in <= delay_queues
    assert await applied_ids(engine) == [str(message.message_id)]
    assert await inbox_count(engine) == 1
    assert await depth(STOCK_COMMANDS.dlq) == 0


async def test_a_message_that_always_fails_transiently_is_dead_lettered_after_max_attempts(
    engine: AsyncEngine,
    rabbit: RabbitTransport,
    amqp_channel: aio_pika.abc.AbstractChannel,
    consume: Any,
    depth: Any,
    retry_policy: RetryPolicy,
) -> None:
    participant = FlakyParticipant(failures=10**6)
    processor = processor_for(engine, participant, retry_policy)
    await consume(processor)
    message = reservation("order-1")

    await rabbit.publish_batch([outgoing(message)])

    await eventually(lambda: depth(STOCK_COMMANDS.dlq), message="dead-lettered")
    [letter] = await take_all(amqp_channel, STOCK_COMMANDS.dlq)
    assert participant.calls[message.message_id] == retry_policy.max_attempts
    assert letter.headers[t.H_ATTEMPT] == retry_policy.max_attempts
    assert text(letter.headers[t.H_REASON_CLASS]) == "transient_exhausted"
    assert f"gave up after {retry_policy.max_attempts} attempts" in text(letter.headers[t.H_REASON])
    assert text(letter.headers[t.H_SAGA_ID]) == "order-1"
    assert text(letter.headers[t.H_ORIGINAL_EXCHANGE]) == COMMANDS_EXCHANGE
    assert text(letter.headers[t.H_ORIGINAL_ROUTING_KEY]) == "stock.reserve"
    failure_headers_are_well_formed(letter.headers)
    assert letter.message_id == str(message.message_id)
    assert letter.body == encode(message.envelope)
    # Backoff: the jittered delay before attempt a+1 is at least half of delay_ms(a);
    # the broker's TTL clock counts whole milliseconds, hence the 1 ms allowance.
    gaps = [later - earlier for earlier, later in itertools.pairwise(participant.call_times)]
    for attempt, gap in enumerate(gaps, start=1):
        assert gap >= retry_policy.delay_ms(attempt) / 2000 - 0.001, (attempt, gaps)
    assert await applied_ids(engine) == []
    assert processor.processed == 0
    assert await depth(STOCK_COMMANDS.name) == 0


@pytest.mark.parametrize(
    ("error", "reason_class"),
    [(BusinessRuleError("sku-1 is not sold any more"), "business_rule"), (KeyError("sku-1"), "handler_error")],
    ids=["business-rule", "unexpected-error"],
)
async def test_a_permanent_handler_failure_is_dead_lettered_at_once(
    engine: AsyncEngine,
    rabbit: RabbitTransport,
    amqp_channel: aio_pika.abc.AbstractChannel,
    consume: Any,
    depth: Any,
    retry_policy: RetryPolicy,
    error: Exception,
    reason_class: str,
) -> None:
    calls = 0

    async def refuse(uow: UnitOfWork, message: Message[ReserveStock]) -> None:
        nonlocal calls
        calls += 1
        await record_reservation(uow, message)  # rolled back with the failure
        raise error

    processor = processor_for(engine, refuse, retry_policy)
    await consume(processor)
    await rabbit.publish_batch([outgoing(reservation("order-1"))])

    await eventually(lambda: depth(STOCK_COMMANDS.dlq), message="dead-lettered")
    [letter] = await take_all(amqp_channel, STOCK_COMMANDS.dlq)
    assert calls == 1
    assert text(letter.headers[t.H_REASON_CLASS]) == reason_class
    assert "sku-1" in text(letter.headers[t.H_REASON])
    assert letter.headers[t.H_ATTEMPT] == 1
    assert await applied_ids(engine) == []
    assert await inbox_count(engine) == 0


# ------------------------------------------------------------------ concurrency


async def test_two_consumers_of_one_queue_apply_each_effect_exactly_once(
    engine: AsyncEngine, rabbit: RabbitTransport, consume: Any, retry_policy: RetryPolicy
) -> None:
    messages = [reservation(f"order-{n:03d}") for n in range(200)]
    publishes = []
    for n, message in enumerate(messages):
        publishes.append(outgoing(message))
        if n % 4 == 0:  # the copy right behind the original: likely on the other consumer
            publishes.append(outgoing(message))
    duplicates = len(publishes) - len(messages)
    processors = [processor_for(engine, record_reservation, retry_policy) for _ in range(2)]
    for processor in processors:
        await consume(processor, prefetch=10)

    await rabbit.publish_batch(publishes)

    def handled() -> int:
        return sum(p.processed + p.duplicates for p in processors)

    await eventually(lambda: handled() == len(publishes), timeout=30)
    assert sum(p.processed for p in processors) == len(messages)
    assert sum(p.duplicates for p in processors) == duplicates
    assert all(p.processed > 0 for p in processors), "both consumers took part"
    applied = await applied_ids(engine)
    assert sorted(applied) == sorted(str(m.message_id) for m in messages)
    assert await inbox_count(engine) == len(messages)


# ------------------------------------------------------------------ batches


async def test_batched_consumer_applies_each_once_and_isolates_a_poison_message(
    engine: AsyncEngine, rabbit: RabbitTransport, consume: Any, amqp_channel: Any, depth: Any, retry_policy: RetryPolicy
) -> None:
    """Many messages per transaction, same guarantees: duplicates skipped, one bad
    message dead-lettered alone, every good one applied exactly once."""
    async with engine.begin() as connection:
        await connection.execute(delete(effects))
        await connection.execute(delete(tables_for(CONSUMER).inbox))
    messages = [reservation(f"batch-{n:03d}") for n in range(150)]
    poison = reservation("batch-poison")
    publishes = [outgoing(m) for m in messages]
    publishes[40:40] = [outgoing(poison)]
    publishes += [outgoing(m) for m in messages[:30]]  # redelivered copies

    async def refuse_poison(uow: UnitOfWork, message: Message[ReserveStock]) -> None:
        if message.payload.order_id == "batch-poison":
            raise BusinessRuleError("sku-1 is discontinued for batch-poison")
        await record_reservation(uow, message)

    processor = processor_for(engine, refuse_poison, retry_policy)
    batching = BatchingConsumer(processor, max_batch=25, workers=2)
    await consume(batching, prefetch=100)
    await rabbit.publish_batch(publishes)

    await eventually(lambda: processor.processed == len(messages) and processor.duplicates == 30, timeout=30)
    await eventually(lambda: depth(STOCK_COMMANDS.dlq), message="poison dead-lettered")
    [letter] = await take_all(amqp_channel, STOCK_COMMANDS.dlq)
    assert text(letter.headers[t.H_REASON_CLASS]) == "business_rule"
    assert sorted(await applied_ids(engine)) == sorted(str(m.message_id) for m in messages)
    assert await inbox_count(engine) == len(messages)
    assert batching.largest_batch > 1, "deliveries were applied in shared transactions"
    batching.close()
