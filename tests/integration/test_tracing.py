"""A trace crosses the outbox, the relay and the real RabbitMQ into the consumer.

The producer's span context is written with the message (envelope and AMQP headers);
the consumer's span continues that trace as a child of the producer's span, and what
the handler sends in turn carries the same trace onward.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts import Message, ReserveStock, StockLine, StockReserved
from infra.clock import SystemClock
from infra.pipeline import MessageProcessor
from infra.transport.rabbit import RabbitTransport
from outbox.relay import Relay
from outbox.tables import tables_for
from outbox.uow import UnitOfWork
from tests.support import eventually

pytestmark = pytest.mark.integration

PRODUCER, CONSUMER = "saga", "stock"
clock = SystemClock()


@pytest.fixture(autouse=True)
async def empty_tables(pg_engine: AsyncEngine) -> None:
    async with pg_engine.begin() as connection:
        await connection.execute(delete(tables_for(PRODUCER).outbox))
        await connection.execute(delete(tables_for(CONSUMER).outbox))
        await connection.execute(delete(tables_for(CONSUMER).inbox))


async def reserve_and_reply(uow: UnitOfWork, message: Message[ReserveStock]) -> None:
    """The test participant: answer every reservation with `stock.reserved`."""
    uow.send(StockReserved(order_id=message.payload.order_id, lines=message.payload.lines))


async def send_reservation(engine: AsyncEngine, order_id: str) -> Message[ReserveStock]:
    async with UnitOfWork(engine, PRODUCER, clock) as uow:
        command = uow.send(
            ReserveStock(order_id=order_id, lines=(StockLine(sku="sku-1", quantity=1),)),
            correlation_id=order_id,
        )
        await uow.commit()
    return command


async def relay_and_consume(engine: AsyncEngine, rabbit: RabbitTransport, consume: Any) -> None:
    """Relay (outside any span) through RabbitMQ to a stock consumer; wait until it is done."""
    processor = MessageProcessor(engine, CONSUMER, CONSUMER, {"stock.reserve": reserve_and_reply}, clock)
    await consume(processor)
    assert await Relay(engine, PRODUCER, rabbit, clock).drain() == 1
    await eventually(lambda: processor.processed == 1)


def finished(spans: InMemorySpanExporter, kind: trace.SpanKind, message_id: uuid.UUID, operation: str) -> ReadableSpan | None:
    for span in spans.get_finished_spans():
        attributes = span.attributes or {}
        if (
            span.kind is kind
            and attributes.get("messaging.message.id") == str(message_id)
            and attributes.get("messaging.operation.type") == operation
        ):
            return span
    return None


def consumer_span(spans: InMemorySpanExporter, message_id: uuid.UUID) -> ReadableSpan | None:
    return finished(spans, trace.SpanKind.CONSUMER, message_id, "process")


async def reply_traceparent(engine: AsyncEngine) -> tuple[int, int]:
    """(trace id, span id) of the `stock.reserved` the handler sent, as stored."""
    outbox = tables_for(CONSUMER).outbox
    async with engine.connect() as connection:
        [row] = (await connection.execute(select(outbox))).all()
    assert row.type == "stock.reserved"
    traceparent = json.loads(row.headers)["traceparent"]
    assert json.loads(row.body)["traceparent"] == traceparent
    _version, trace_id, span_id, _flags = traceparent.split("-")
    return int(trace_id, 16), int(span_id, 16)


async def test_a_trace_started_at_the_producer_runs_through_send_process_and_the_reply(
    pg_engine: AsyncEngine, rabbit: RabbitTransport, consume: Any, spans: InMemorySpanExporter
) -> None:
    with trace.get_tracer("tests.producer").start_as_current_span("produce") as produce:
        command = await send_reservation(pg_engine, "order-1")
    producer = produce.get_span_context()

    await relay_and_consume(pg_engine, rabbit, consume)

    # The span that wrote the message is its creation context; it travels with the message.
    assert finished(spans, trace.SpanKind.PRODUCER, command.message_id, "create") is None
    assert command.envelope.traceparent == f"00-{producer.trace_id:032x}-{producer.span_id:016x}-{int(producer.trace_flags):02x}"
    # The relay's publish and the consumer's process are both children of the creation context.
    send = await eventually(lambda: finished(spans, trace.SpanKind.PRODUCER, command.message_id, "send"), message="send span")
    assert send.name == "send compensa.commands"
    assert send.parent is not None and send.parent.span_id == producer.span_id
    assert send.attributes["messaging.rabbitmq.destination.routing_key"] == "stock.reserve"
    span = await eventually(lambda: consumer_span(spans, command.message_id), message="consumer span exported")
    assert span.name == "stock.commands process stock.reserve"
    assert span.context.trace_id == producer.trace_id
    assert span.parent is not None and span.parent.span_id == producer.span_id
    assert span.attributes["compensa.saga_id"] == "order-1"
    assert span.attributes["messaging.message.conversation_id"] == "order-1"
    assert span.attributes["compensa.attempt"] == 1
    assert span.attributes["compensa.handler"] == "stock"
    # The handler runs inside the process span; what it sends carries that span's context.
    reply_trace, reply_span = await reply_traceparent(pg_engine)
    assert (reply_trace, reply_span) == (producer.trace_id, span.context.span_id)
    assert not [s.name for s in spans.get_finished_spans() if s.name.startswith("create ")]


async def test_a_message_sent_outside_any_trace_starts_its_trace_at_the_outbox_write(
    pg_engine: AsyncEngine, rabbit: RabbitTransport, consume: Any, spans: InMemorySpanExporter
) -> None:
    command = await send_reservation(pg_engine, "order-2")
    create = finished(spans, trace.SpanKind.PRODUCER, command.message_id, "create")
    assert create is not None and create.parent is None, "the outbox write is the root"
    assert command.envelope.traceparent is not None

    await relay_and_consume(pg_engine, rabbit, consume)

    span = await eventually(lambda: consumer_span(spans, command.message_id), message="consumer span exported")
    assert span.parent is not None and span.parent.span_id == create.context.span_id
    assert (await reply_traceparent(pg_engine))[0] == create.context.trace_id
