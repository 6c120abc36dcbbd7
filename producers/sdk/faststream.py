"""compensa for FastStream apps: publish events into compensa, consume its events typed.

For upstream Python services built on FastStream (``faststream[rabbit]``). Nothing in
compensa's own services imports this module: their hot path stays on aio-pika
(docs/architecture.md, "FastStream").

Publishing (`publish`) goes straight to RabbitMQ: a valid envelope on
``compensa.events`` under its type, the AMQP message-id, type and correlation id
repeating the envelope's, persistent, with the caller's trace context, and confirmed
by the broker. It has no outbox: a failure raises `PublishNotConfirmed` and the
caller must retry (with the returned message, so the id stays the same) for
at-least-once. To publish atomically with your own database change, use
`producers.sdk.publish` (the transactional outbox) instead.

Consuming (`events_router` + `subscribe`): the app's own durable queue, bound to
``compensa.events`` for the event types it names and dead-lettering to
``<queue>.dlq``. Each delivery is decoded and validated against the contracts before
the handler sees it; a malformed one (not an envelope, unknown type or version,
invalid payload, AMQP message-id other than the envelope's, a type the subscriber did
not ask for) is rejected to the DLQ and logged, never handed to the handler. The
handler runs in a *process* span continuing the producer's trace, and `seen` records
the event in an inbox table in the handler's own transaction, so a redelivery is
skipped::

    broker = RabbitBroker(url)
    router = events_router()
    outcomes = subscribe(router, "shipping.order-outcomes", "order.completed", "order.cancelled")

    @outcomes(filter=of_type("order.completed"))
    async def completed(event: Message[OrderCompleted]) -> None:
        async with engine.begin() as connection:
            if await seen(connection, event, consumer="shipping", inbox=SHIPPING_INBOX):
                return
            ...  # the effect, committed with the inbox row

    broker.include_router(router)
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aio_pika
import aiormq
import structlog
from faststream import AckPolicy, BaseMiddleware, StreamMessage
from faststream.exceptions import RejectMessage
from faststream.rabbit import ExchangeType, RabbitBroker, RabbitExchange, RabbitQueue, RabbitRouter
from faststream.rabbit.subscriber import RabbitSubscriber
from opentelemetry import trace
from sqlalchemy import Table
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from contracts import EVENTS as EVENT_CONTRACTS
from contracts import ContractError, Message, Payload, TransientError, decode, encode
from contracts.routing import EVENTS_EXCHANGE, exchange_for
from outbox.tables import inbox_table
from outbox.tracing import context_from, tracer
from outbox.uow import record_in_inbox
from producers.sdk.outbox import build_message

if TYPE_CHECKING:
    from faststream.rabbit.schemas.queue import ClassicQueueArgs

__all__ = [
    "EVENTS",
    "PublishNotConfirmed",
    "events_router",
    "inbox_table",
    "of_type",
    "publish",
    "seen",
    "subscribe",
]

log = structlog.get_logger("compensa.faststream")

#: compensa's events exchange. compensa declares its topology (``compensa topology
#: declare``); a FastStream app only checks that it exists, which needs no configure
#: permission on it.
EVENTS = RabbitExchange(EVENTS_EXCHANGE, type=ExchangeType.TOPIC, durable=True, declare=False)

_EVENT_TYPES = frozenset(model.message_type for model in EVENT_CONTRACTS)

_PUBLISH_ERRORS = (
    aio_pika.exceptions.AMQPError,
    aiormq.exceptions.AMQPError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)


class PublishNotConfirmed(TransientError):
    """The broker did not confirm a publish: send the same message again."""


# ------------------------------------------------------------------ publishing


async def publish(
    broker: RabbitBroker,
    payload: Payload | Mapping[str, Any] | Message[Any],
    *,
    correlation_id: str | None = None,
    producer: str | None = None,
    type: str | None = None,  # noqa: A002 - mirrors the envelope's field
    version: int | None = None,
    causation_id: uuid.UUID | None = None,
    message_id: uuid.UUID | None = None,
    occurred_at: datetime | None = None,
    timeout: float = 10.0,
) -> Message[Any]:
    """Publish one compensa event from a FastStream app; return it once the broker confirmed it.

    The payload is validated and wrapped in an envelope whose traceparent is a *create*
    span under the active span. Raise ContractError for an invalid event or a command
    (only compensa sends commands), PublishNotConfirmed when the broker did not confirm
    it: retry with the returned or a rebuilt message under the same `message_id`, and
    compensa's inboxes drop the duplicate.
    """
    message = build_message(
        payload,
        correlation_id=correlation_id,
        producer=producer,
        type_=type,
        version=version,
        causation_id=causation_id,
        message_id=message_id,
        occurred_at=occurred_at,
    )
    kind = message.payload.kind
    if exchange_for(kind) != EVENTS.name:
        raise ContractError(f"{message.type} is a {kind}: only events may be published into compensa")
    envelope = message.envelope
    headers: dict[str, Any] = {"traceparent": envelope.traceparent} if envelope.traceparent else {}
    try:
        confirmation = await broker.publish(
            encode(envelope),
            exchange=EVENTS,
            routing_key=envelope.type,
            # An event nobody consumes is not an error (as for compensa's relay).
            mandatory=False,
            persist=True,
            timeout=timeout,
            correlation_id=envelope.correlation_id,
            message_id=str(envelope.message_id),
            message_type=envelope.type,
            content_type="application/json",
            headers=headers,
            timestamp=envelope.occurred_at,
        )
    except _PUBLISH_ERRORS as exc:
        raise PublishNotConfirmed(f"{envelope.type} {envelope.message_id} not confirmed: {exc!r}") from exc
    if confirmation is None:
        raise PublishNotConfirmed(
            "the broker's channel does not confirm publishes: create the RabbitBroker without "
            "default_channel=Channel(publisher_confirms=False)"
        )
    return message


# ------------------------------------------------------------------ consuming


def events_router(*, middlewares: tuple[Any, ...] = (), **options: Any) -> RabbitRouter:
    """A RabbitRouter for compensa subscribers: each handler runs in a span continuing the event's trace.

    `options` go to RabbitRouter (prefix, dependencies…); include it with
    ``broker.include_router(router)``.
    """
    return RabbitRouter(middlewares=(_ProcessSpan, *middlewares), **options)


def subscribe(
    router: RabbitRouter | RabbitBroker,
    queue: str,
    *types: str,
    ack_policy: AckPolicy = AckPolicy.REJECT_ON_ERROR,
    dead_letters: bool = True,
    **options: Any,
) -> RabbitSubscriber:
    """Subscribe the app's own durable `queue` to the compensa events `types`; return the subscriber.

    Decorate handlers with the result (``@sub`` or ``@sub(filter=of_type(...))``); each
    receives a validated ``contracts.Message``. Malformed deliveries are rejected, to
    ``<queue>.dlq`` with `dead_letters` (declared here; without it RabbitMQ drops them).
    `ack_policy` decides what a failing handler's message gets: rejected to the DLQ by
    default; ``AckPolicy.NACK_ON_ERROR`` requeues it (a handler that keeps failing then
    loops). Declaring the queue needs configure permission on it and read on
    ``compensa.events``. Use a router from `events_router` for the trace spans.
    """
    if not types:
        raise ValueError("name at least one event type, e.g. subscribe(router, 'shipping.events', 'order.completed')")
    unknown = sorted(set(types) - _EVENT_TYPES)
    if unknown:
        raise ValueError(f"not compensa events: {', '.join(unknown)} (events: {', '.join(sorted(_EVENT_TYPES))})")
    arguments: ClassicQueueArgs = {}
    if dead_letters:
        dlq = f"{queue}.dlq"
        arguments = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dlq}
        # A subscriber without a handler declares its queue and consumes nothing.
        router.subscriber(RabbitQueue(dlq, durable=True), include_in_schema=False)
    for extra in types[1:]:
        # One binding per subscriber in FastStream: the other types bind through subscribers without handlers.
        router.subscriber(
            RabbitQueue(queue, durable=True, arguments=arguments, routing_key=extra), EVENTS, include_in_schema=False
        )
    return router.subscriber(
        RabbitQueue(queue, durable=True, arguments=arguments, routing_key=types[0]),
        EVENTS,
        decoder=_decoder(frozenset(types)),
        ack_policy=ack_policy,
        **options,
    )


def of_type(*types: str | type[Payload]) -> Callable[[StreamMessage[Any]], Awaitable[bool]]:
    """A FastStream filter: route an event to the handler of its type (``@sub(filter=of_type(...))``)."""
    names = frozenset(t if isinstance(t, str) else t.message_type for t in types)

    async def matches(msg: StreamMessage[Any]) -> bool:
        message = await msg.decode()
        return isinstance(message, Message) and message.type in names

    return matches


async def seen(target: AsyncConnection | AsyncSession, message: Message[Any], *, consumer: str, inbox: Table) -> bool:
    """Record the event in `inbox` inside the caller's transaction; True when it was already there.

    Skip the event when True. `inbox` is a table shaped like compensa's inboxes
    (`inbox_table("shipping_inbox", metadata)`); its row commits or rolls back with
    the handler's change. Raise ContractError for an id seen before with other content.
    """
    connection = target if isinstance(target, AsyncConnection) else await target.connection()
    return await record_in_inbox(connection, inbox, consumer, message, datetime.now(UTC))


def _decoder(types: frozenset[str]) -> Callable[[StreamMessage[Any]], Awaitable[Message[Payload]]]:
    async def decode_event(msg: StreamMessage[Any]) -> Message[Payload]:
        """Decode and validate one delivery; reject it (to the DLQ) when it is not a valid compensa event."""
        amqp_message_id = getattr(msg.raw_message, "message_id", None)
        try:
            message = decode(msg.body)
            if not amqp_message_id:
                raise ContractError("AMQP message-id property is missing")
            if amqp_message_id != str(message.message_id):
                raise ContractError(f"AMQP message-id {amqp_message_id!r} != envelope message_id {message.message_id}")
            if message.type not in types:
                raise ContractError(f"this subscriber takes {', '.join(sorted(types))}, not {message.type!r}")
        except ContractError as exc:
            log.warning(
                "faststream.message_rejected",
                reason_class=exc.reason_class,
                reason=str(exc),
                message_id=amqp_message_id,
                routing_key=getattr(msg.raw_message, "routing_key", None),
            )
            raise RejectMessage() from exc
        return message

    return decode_event


class _ProcessSpan(BaseMiddleware):
    """Run the handler in a *process* span, a child of the event's creation context."""

    async def consume_scope(self, call_next: Callable[[Any], Awaitable[Any]], msg: StreamMessage[Any]) -> Any:
        message = await msg.decode()  # cached: the handler gets the same object
        if not isinstance(message, Message):
            return await call_next(msg)
        raw = msg.raw_message
        with tracer.start_as_current_span(
            f"process {message.type}",
            context=context_from(message.envelope.traceparent, msg.headers),
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.destination.name": getattr(raw, "exchange", None) or "",
                "messaging.rabbitmq.destination.routing_key": getattr(raw, "routing_key", None) or "",
                "messaging.message.id": str(message.message_id),
                "messaging.message.conversation_id": message.correlation_id,
                "compensa.saga_id": message.correlation_id,
            },
        ):
            return await call_next(msg)
