"""The FastStream integration (`producers.sdk.faststream`) on the real RabbitMQ and PostgreSQL.

A FastStream app publishes `order.created` and compensa's own consumer pipeline takes it
(the envelope valid, the AMQP ids the envelope's, the trace continued); compensa's relay
publishes `order.completed` and a FastStream subscriber gets it typed, skips its
redelivery through its inbox, and never sees a malformed message, which lands in its DLQ.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest
from faststream.rabbit import Channel, RabbitBroker
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import Column, MetaData, String, Table, func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts import Message, Money, OrderCancelled, OrderCompleted, OrderCreated, OrderLine, OrderRejected, encode, new_message
from contracts.routing import EVENTS_EXCHANGE
from infra.clock import SystemClock
from infra.pipeline import MessageProcessor
from infra.topology import SAGA_STARTS
from infra.transport.rabbit import RabbitTransport
from outbox.relay import Relay
from outbox.tables import tables_for
from outbox.uow import UnitOfWork
from producers.sdk.faststream import PublishNotConfirmed, events_router, inbox_table, of_type, publish, seen, subscribe
from tests.integration.conftest import queue_depth
from tests.support import eventually

pytestmark = pytest.mark.integration

clock = SystemClock()
tracer = trace.get_tracer("tests.upstream")

#: The upstream app's own tables, in its own metadata (here on the module's database).
shipping_metadata = MetaData()
SHIPPING_INBOX = inbox_table("shipping_inbox", shipping_metadata)
shipments = Table(
    "shipping_shipments",
    shipping_metadata,
    Column("order_id", String(64), primary_key=True),
    Column("message_id", String(36), nullable=False),
    Column("outcome", String(32), nullable=False),
)
QUEUE = "it-shipping.order-outcomes"


@pytest.fixture(scope="module")
async def shipping_db(pg_engine: AsyncEngine) -> AsyncEngine:
    async with pg_engine.begin() as connection:
        await connection.run_sync(shipping_metadata.create_all)
    return pg_engine


@pytest.fixture
async def broker(amqp_url: str) -> AsyncIterator[RabbitBroker]:
    broker = RabbitBroker(amqp_url)
    try:
        yield broker
    finally:
        await broker.stop()


def order_created(order_id: str) -> OrderCreated:
    return OrderCreated(
        order_id=order_id,
        customer_id="c-1",
        lines=(OrderLine(sku="SKU-1", quantity=2, unit_price=1500),),
        total=Money(amount=3000, currency="EUR"),
        payment_token="tok_ok_1",
    )


def spans_named(spans: InMemorySpanExporter, name: str, message_id: uuid.UUID) -> list[ReadableSpan]:
    return [
        s
        for s in spans.get_finished_spans()
        if s.name == name and (s.attributes or {}).get("messaging.message.id") == str(message_id)
    ]


def span_named(spans: InMemorySpanExporter, name: str, message_id: uuid.UUID) -> ReadableSpan:
    [span] = spans_named(spans, name, message_id)
    return span


def span_id_of(traceparent: str | None) -> int:
    assert traceparent is not None
    return int(traceparent.split("-")[2], 16)


# ------------------------------------------------------------------ publishing


async def test_an_event_published_from_a_faststream_app_is_taken_by_compensas_pipeline(
    pg_engine: AsyncEngine,
    rabbit: RabbitTransport,
    broker: RabbitBroker,
    amqp_channel: aio_pika.abc.AbstractChannel,
    spans: InMemorySpanExporter,
) -> None:
    for name in (SAGA_STARTS.name, SAGA_STARTS.dlq):
        await (await amqp_channel.get_queue(name, ensure=True)).purge()
    # A second binding of the same routing key, to read the AMQP properties as sent.
    probe = await amqp_channel.declare_queue(exclusive=True)
    await probe.bind(EVENTS_EXCHANGE, routing_key="order.created")

    taken: list[tuple[Message[Any], trace.SpanContext]] = []

    async def start_saga(uow: UnitOfWork, message: Message[OrderCreated]) -> None:
        taken.append((message, trace.get_current_span().get_span_context()))

    processor = MessageProcessor(pg_engine, "saga", "saga", {"order.created": start_saga}, clock)
    subscription = await rabbit.consume(SAGA_STARTS, processor, 10)
    try:
        await broker.connect()
        order_id = f"fs-{uuid.uuid4().hex[:8]}"
        with tracer.start_as_current_span("shop checkout") as checkout:
            sent = await publish(broker, order_created(order_id), correlation_id=order_id, producer="shop")
        await eventually(lambda: processor.processed == 1, message="compensa's pipeline did not take the event")
    finally:
        await subscription.stop(grace_seconds=5)

    assert await queue_depth(amqp_channel, SAGA_STARTS.dlq) == 0
    [(message, handled_in)] = taken
    assert message.message_id == sent.message_id
    assert message.envelope == sent.envelope
    assert message.payload == order_created(order_id)
    assert message.envelope.producer == "shop" and message.correlation_id == order_id

    raw = await eventually(lambda: probe.get(no_ack=True, fail=False))
    assert raw.message_id == str(sent.message_id)
    assert raw.type == "order.created"
    assert raw.correlation_id == order_id
    assert raw.content_type == "application/json"
    assert raw.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert raw.routing_key == "order.created" and raw.exchange == EVENTS_EXCHANGE
    assert raw.headers["traceparent"] == sent.envelope.traceparent
    assert raw.body == encode(sent.envelope)

    # One trace: the app's span → the create span (its context in the message) → compensa's process span.
    create = span_named(spans, "create order.created", sent.message_id)
    assert create.parent is not None and create.parent.span_id == checkout.get_span_context().span_id
    assert span_id_of(sent.envelope.traceparent) == create.context.span_id
    process = span_named(spans, "saga.starts process order.created", sent.message_id)
    assert process.parent is not None and process.parent.span_id == create.context.span_id
    assert handled_in.trace_id == checkout.get_span_context().trace_id


async def test_publish_refuses_commands_and_invalid_payloads_before_sending(broker: RabbitBroker) -> None:
    from contracts import ContractError, ReserveStock, StockLine

    await broker.connect()
    with pytest.raises(ContractError, match="only events"):
        await publish(
            broker, ReserveStock(order_id="o-1", lines=(StockLine(sku="s", quantity=1),)), correlation_id="o-1", producer="shop"
        )
    with pytest.raises(ContractError, match=r"invalid payload for order\.created"):
        await publish(broker, {"order_id": "o-1"}, type="order.created", correlation_id="o-1", producer="shop")
    with pytest.raises(ContractError, match="correlation_id"):
        await publish(broker, order_created("o-1"), correlation_id="o-2", producer="shop")


async def test_a_broker_without_publisher_confirms_is_refused(amqp_url: str) -> None:
    unconfirmed = RabbitBroker(amqp_url, default_channel=Channel(publisher_confirms=False))
    try:
        await unconfirmed.connect()
        with pytest.raises(PublishNotConfirmed, match="publisher_confirms"):
            await publish(unconfirmed, order_created("o-nc"), correlation_id="o-nc", producer="shop")
    finally:
        await unconfirmed.stop()


# ------------------------------------------------------------------ consuming


async def test_a_faststream_subscriber_gets_compensas_events_typed_once_and_never_a_malformed_one(
    shipping_db: AsyncEngine,
    rabbit: RabbitTransport,
    broker: RabbitBroker,
    amqp_channel: aio_pika.abc.AbstractChannel,
    spans: InMemorySpanExporter,
) -> None:
    engine = shipping_db
    for name in (QUEUE, f"{QUEUE}.dlq"):
        await amqp_channel.queue_delete(name)

    handled: list[tuple[Message[Any], trace.SpanContext]] = []
    skipped: list[uuid.UUID] = []

    router = events_router()
    outcomes = subscribe(router, QUEUE, "order.completed", "order.cancelled")

    async def ship(event: Message[Any], outcome: str) -> None:
        async with engine.begin() as connection:
            if await seen(connection, event, consumer="shipping", inbox=SHIPPING_INBOX):
                skipped.append(event.message_id)
                return
            await connection.execute(
                shipments.insert().values(order_id=event.payload.order_id, message_id=str(event.message_id), outcome=outcome)
            )
        handled.append((event, trace.get_current_span().get_span_context()))

    @outcomes(filter=of_type(OrderCompleted))
    async def completed(event: Message[OrderCompleted]) -> None:
        assert isinstance(event.payload, OrderCompleted)
        await ship(event, "ship")

    @outcomes(filter=of_type("order.cancelled"))
    async def cancelled(event: Message[OrderCancelled]) -> None:
        assert isinstance(event.payload, OrderCancelled)
        await ship(event, "cancel")

    broker.include_router(router)
    await broker.start()

    # compensa's orders service commits the events through its outbox; the relay publishes them.
    done, dropped = f"fs-{uuid.uuid4().hex[:8]}", f"fs-{uuid.uuid4().hex[:8]}"
    with tracer.start_as_current_span("orders service") as producer:
        async with UnitOfWork(engine, "orders", clock) as uow:
            sent = uow.send(OrderCompleted(order_id=done, total=Money(amount=3000, currency="EUR")), correlation_id=done)
            sent_cancel = uow.send(OrderCancelled(order_id=dropped, reason="payment declined"), correlation_id=dropped)
            await uow.commit()
    relay = Relay(engine, "orders", rabbit, clock)
    assert await relay.drain() == 2
    await eventually(lambda: len(handled) == 2, message="the subscriber did not get both events")

    by_type = {event.type: event for event, _ in handled}
    assert by_type["order.completed"].envelope == sent.envelope
    assert by_type["order.completed"].payload == sent.payload
    assert type(by_type["order.cancelled"].payload) is OrderCancelled

    # The relay crashed after the broker confirmed and before it marked the row: it publishes again.
    outbox = tables_for("orders").outbox
    async with engine.begin() as connection:
        await connection.execute(update(outbox).where(outbox.c.message_id == str(sent.message_id)).values(sent_at=None))
    assert await relay.drain() == 1
    await eventually(lambda: skipped == [sent.message_id], message="the redelivery was not skipped by the inbox")

    # Malformed deliveries never reach a handler: they are rejected to the app's DLQ.
    exchange = await amqp_channel.get_exchange(EVENTS_EXCHANGE)
    other_id = uuid.uuid4()
    valid_body = encode(
        new_message(
            OrderCompleted(order_id="x-1", total=Money(amount=1, currency="EUR")), correlation_id="x-1", producer="p"
        ).envelope
    )
    rejected = new_message(OrderRejected(order_id="x-2", reason="no stock"), correlation_id="x-2", producer="p").envelope
    bad = [
        (b"not json", "order.completed", str(other_id)),  # not an envelope
        (valid_body, "order.completed", str(other_id)),  # AMQP message-id is not the envelope's
        (b'{"message_id": "' + str(other_id).encode() + b'", "type": "order.completed"}', "order.completed", str(other_id)),
    ]
    for body, key, message_id in bad:
        await exchange.publish(aio_pika.Message(body, message_id=message_id, content_type="application/json"), routing_key=key)
    # A valid event of a type the subscriber did not ask for, straight into its queue.
    await amqp_channel.default_exchange.publish(
        aio_pika.Message(encode(rejected), message_id=str(rejected.message_id), content_type="application/json"),
        routing_key=QUEUE,
    )
    await eventually(
        lambda: _dead_lettered(amqp_channel, 4), message="the malformed messages did not all reach the DLQ", timeout=10
    )
    assert len(handled) == 2 and skipped == [sent.message_id]
    async with engine.connect() as connection:
        rows = (await connection.execute(select(shipments.c.order_id, shipments.c.outcome).order_by(shipments.c.outcome))).all()
        inbox_rows = (await connection.execute(select(func.count()).select_from(SHIPPING_INBOX))).scalar_one()
    assert [tuple(r) for r in rows] == [(dropped, "cancel"), (done, "ship")]
    assert inbox_rows == 2

    # The handler ran in a process span continuing the trace from the orders service (twice: the redelivery too).
    first, again = sorted(spans_named(spans, "process order.completed", sent.message_id), key=lambda s: s.start_time or 0)
    assert again.parent == first.parent
    process = first
    assert process.parent is not None and process.parent.span_id == span_id_of(sent.envelope.traceparent)
    assert process.context.trace_id == producer.get_span_context().trace_id
    handled_in = {event.type: span for event, span in handled}["order.completed"]
    assert handled_in.trace_id == producer.get_span_context().trace_id
    assert handled_in.span_id == process.context.span_id
    assert sent_cancel.envelope.traceparent is not None


async def _dead_lettered(channel: aio_pika.abc.AbstractChannel, count: int) -> bool:
    return await queue_depth(channel, f"{QUEUE}.dlq") == count
