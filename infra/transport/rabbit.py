"""RabbitMQ transport on aio-pika: confirmed persistent publishes, manual acks."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import aio_pika
import aiormq
import structlog
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage, AbstractRobustConnection

from contracts import TransientError
from contracts.routing import COMMANDS_EXCHANGE, DEFAULT_EXCHANGE
from infra import topology as t
from infra.clock import SystemClock
from infra.topology import QueueSpec
from infra.transport.base import Delivery, DeliveryHandler
from outbox.ports import OutgoingMessage
from outbox.tracing import end_spans, publish_spans

log = structlog.get_logger("compensa.rabbit")

_PUBLISH_ERRORS = (
    aio_pika.exceptions.AMQPError,
    aiormq.exceptions.AMQPError,
    ConnectionError,
    asyncio.TimeoutError,
    OSError,
)


def _amqp_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in headers.items() if v is not None}


class RabbitDelivery(Delivery):
    def __init__(
        self, transport: RabbitTransport, queue: QueueSpec, message: AbstractIncomingMessage, channel: AbstractChannel
    ) -> None:
        self._transport = transport
        self._message = message
        self._channel = channel
        self.queue = queue
        self.body = message.body
        self.headers = dict(message.headers or {})
        self.message_id = message.message_id
        self.correlation_id = message.correlation_id
        self.exchange = message.exchange or ""
        self.routing_key = message.routing_key or ""
        self.redelivered = bool(message.redelivered)

    def _copy(self, headers: Mapping[str, Any], expiration_ms: int | None = None) -> aio_pika.Message:
        source = self._message
        return aio_pika.Message(
            body=self.body,
            headers=_amqp_headers(headers),
            content_type=source.content_type or "application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=source.message_id,
            correlation_id=source.correlation_id,
            type=source.type,
            expiration=(expiration_ms / 1000) if expiration_ms else None,
        )

    async def ack(self) -> None:
        try:
            await self._message.ack()
        except (*_PUBLISH_ERRORS, aiormq.exceptions.ChannelInvalidStateError) as exc:
            # The channel is gone: the broker will redeliver the message.
            raise TransientError(f"ack failed: {exc!r}") from exc

    async def retry(self, delay_ms: int, expiration_ms: int, headers: Mapping[str, Any]) -> None:
        try:
            await self._channel.default_exchange.publish(
                self._copy(headers, expiration_ms),
                routing_key=self.queue.delay_queue(delay_ms),
                mandatory=True,
            )
        except aiormq.exceptions.PublishError:
            # The delay queue does not exist (topology declared with other retry
            # settings): never drop the message, park it in the DLQ saying why.
            log.error("rabbit.delay_queue_missing", queue=self.queue.delay_queue(delay_ms))
            fallback = dict(headers)
            fallback[t.H_REASON_CLASS] = "retry_unroutable"
            fallback[t.H_REASON] = (
                f"delay queue {self.queue.delay_queue(delay_ms)} missing; run `compensa topology declare` "
                f"with the same retry settings. Original failure: {headers.get(t.H_REASON, '')}"
            )[:2000]
            fallback[t.H_ATTEMPT] = self.attempt
            await self.dead_letter(fallback)
            return
        await self.ack()

    async def dead_letter(self, headers: Mapping[str, Any]) -> None:
        exchange = await self._channel.get_exchange(t.DLX.name, ensure=False)
        # Mandatory: if the DLQ is missing, fail loudly and leave the message unacked.
        await exchange.publish(self._copy(headers), routing_key=self.queue.name, mandatory=True)
        await self.ack()


class RabbitSubscription:
    def __init__(
        self, channel: AbstractChannel, queue: aio_pika.abc.AbstractQueue, tag: str, inflight: set[asyncio.Task[Any]]
    ) -> None:
        self._channel = channel
        self._queue = queue
        self._tag = tag
        self._inflight = inflight

    async def stop(self, grace_seconds: float) -> None:
        try:
            await self._queue.cancel(self._tag)
        except _PUBLISH_ERRORS as exc:
            log.warning("rabbit.cancel_failed", queue=self._queue.name, error=repr(exc))
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=grace_seconds)
        # Unacked deliveries go back to the queue when the channel closes.
        await self._channel.close()


class RabbitTransport:
    """Publish and consume through RabbitMQ with the compensa topology."""

    def __init__(
        self,
        url: str,
        *,
        queue_type: str = "classic",
        retry_delays_ms: Sequence[int] = (),
        queues: Sequence[QueueSpec] = t.WORK_QUEUES,
    ) -> None:
        self.url = url
        #: The work queues `declare_topology` declares (the hosted app's).
        self.queues = tuple(queues)
        self.queue_type = queue_type
        self.retry_delays_ms = tuple(retry_delays_ms)
        self._connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self._lock = asyncio.Lock()
        self.clock = SystemClock()

    async def connect(self) -> RabbitTransport:
        if self._connection is None:
            try:
                self._connection = await aio_pika.connect_robust(self.url, timeout=10)
            except _PUBLISH_ERRORS as exc:
                raise TransientError(f"cannot connect to RabbitMQ at {_safe_url(self.url)}: {exc}") from exc
            self._publish_channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        return self

    @property
    def connection(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise RuntimeError("transport not connected; call connect() first")
        return self._connection

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
            self._exchanges.clear()

    # ------------------------------------------------------------ topology

    def _queue_arguments(self, queue: QueueSpec) -> dict[str, Any]:
        return {
            "x-queue-type": self.queue_type,
            "x-dead-letter-exchange": t.DLX.name,
            "x-dead-letter-routing-key": queue.name,
        }

    async def declare_topology(self) -> None:
        """Declare exchanges, work, delay and dead-letter queues; safe to repeat."""
        await self.connect()
        channel = await self.connection.channel()
        try:
            exchanges = {}
            for spec in t.EXCHANGES:
                exchanges[spec.name] = await channel.declare_exchange(
                    spec.name, type=aio_pika.ExchangeType(spec.type), durable=True
                )
            for queue in self.queues:
                work = await channel.declare_queue(queue.name, durable=True, arguments=self._queue_arguments(queue))
                for key in queue.routing_keys:
                    await work.bind(exchanges[queue.exchange.name], routing_key=key)
                for retired_queue, key in t.RETIRED_BINDINGS:
                    if retired_queue == queue:
                        # Unbinding a binding that does not exist is a no-op in RabbitMQ.
                        await work.unbind(exchanges[queue.exchange.name], routing_key=key)
                dlq = await channel.declare_queue(queue.dlq, durable=True, arguments={"x-queue-type": self.queue_type})
                await dlq.bind(exchanges[t.DLX.name], routing_key=queue.name)
                for delay_ms in self.retry_delays_ms:
                    await channel.declare_queue(
                        queue.delay_queue(delay_ms),
                        durable=True,
                        arguments={
                            "x-queue-type": self.queue_type,
                            "x-message-ttl": delay_ms,
                            "x-dead-letter-exchange": "",
                            "x-dead-letter-routing-key": queue.name,
                        },
                    )
        finally:
            await channel.close()

    # ------------------------------------------------------------ publish

    async def _exchange(self, name: str) -> AbstractExchange:
        exchange = self._exchanges.get(name)
        if exchange is None:
            assert self._publish_channel is not None
            exchange = await self._publish_channel.get_exchange(name, ensure=False)
            self._exchanges[name] = exchange
        return exchange

    async def publish_batch(self, messages: Sequence[OutgoingMessage]) -> None:
        """Publish all messages on one confirm channel, in order, and await every confirm."""
        await self.connect()
        spans = publish_spans(messages)
        try:
            pending = []
            for message in messages:
                # Exchange "" is the default exchange: the routing key names one queue (replays).
                exchange = (
                    self._publish_channel.default_exchange
                    if message.exchange == DEFAULT_EXCHANGE and self._publish_channel is not None
                    else await self._exchange(message.exchange)
                )
                amqp_message = aio_pika.Message(
                    body=message.body,
                    headers=_amqp_headers(message.headers),
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=message.message_id,
                    correlation_id=message.correlation_id,
                    type=message.type,
                )
                # Commands and messages addressed to one queue must reach it; unroutable
                # is an error (the relay retries), never a drop.
                pending.append(
                    exchange.publish(
                        amqp_message,
                        routing_key=message.routing_key,
                        mandatory=message.exchange in (COMMANDS_EXCHANGE, DEFAULT_EXCHANGE),
                    )
                )
            results = await asyncio.gather(*pending, return_exceptions=True)
        except _PUBLISH_ERRORS as exc:
            end_spans(spans, exc)
            self._exchanges.clear()
            raise TransientError(f"publish failed: {exc!r}") from exc
        except BaseException as exc:
            end_spans(spans, exc)
            raise
        for span, result in zip(spans, results, strict=True):
            end_spans([span], result if isinstance(result, BaseException) else None)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            self._exchanges.clear()
            raise TransientError(f"{len(failures)} of {len(messages)} publishes not confirmed: {failures[0]!r}")

    # ------------------------------------------------------------ consume

    async def consume(self, queue: QueueSpec, handler: DeliveryHandler, prefetch: int) -> RabbitSubscription:
        await self.connect()
        channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.set_qos(prefetch_count=prefetch)
        amqp_queue = await channel.get_queue(queue.name, ensure=True)
        inflight: set[asyncio.Task[Any]] = set()

        async def on_message(message: AbstractIncomingMessage) -> None:
            task = asyncio.current_task()
            if task is not None:
                inflight.add(task)
            try:
                await handler(RabbitDelivery(self, queue, message, channel))
            finally:
                if task is not None:
                    inflight.discard(task)

        tag = await amqp_queue.consume(on_message, no_ack=False)
        return RabbitSubscription(channel, amqp_queue, tag, inflight)


def _safe_url(url: str) -> str:
    """Hide the password in a URL before it reaches a message or a log."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
