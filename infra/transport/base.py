"""What every transport gives a consumer: a delivery it can ack, retry or dead-letter."""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any, Protocol

from infra import topology as t
from infra.topology import QueueSpec
from outbox.ports import Publisher


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


class Delivery(abc.ABC):
    """One delivery of one message from a work queue."""

    queue: QueueSpec
    body: bytes
    headers: Mapping[str, Any]
    message_id: str | None
    correlation_id: str | None
    exchange: str
    routing_key: str
    redelivered: bool

    @property
    def attempt(self) -> int:
        """1 for the first delivery, n for the n-th after retries through delay queues."""
        try:
            # Bounded: a forged header must not overflow what the archive stores.
            return min(max(1, int(self.headers.get(t.H_ATTEMPT, 1))), 2**31 - 1)
        except (TypeError, ValueError):
            return 1

    @property
    def original_exchange(self) -> str:
        return _text(self.headers.get(t.H_ORIGINAL_EXCHANGE)) or self.exchange

    @property
    def original_routing_key(self) -> str:
        return _text(self.headers.get(t.H_ORIGINAL_ROUTING_KEY)) or self.routing_key

    def _failure_headers(self, reason_class: str, reason: str, now: datetime) -> dict[str, Any]:
        headers = dict(self.headers)
        stamp = now.isoformat()
        headers.setdefault(t.H_FIRST_FAILURE, stamp)
        headers[t.H_LAST_FAILURE] = stamp
        headers[t.H_REASON_CLASS] = reason_class
        headers[t.H_REASON] = reason[:2000]
        headers[t.H_ORIGINAL_EXCHANGE] = self.original_exchange
        headers[t.H_ORIGINAL_ROUTING_KEY] = self.original_routing_key
        headers[t.H_ORIGINAL_QUEUE] = self.queue.name
        return headers

    def retry_headers(self, reason_class: str, reason: str, now: datetime) -> dict[str, Any]:
        headers = self._failure_headers(reason_class, reason, now)
        headers[t.H_ATTEMPT] = self.attempt + 1
        return headers

    def deferral_headers(self, reason_class: str, reason: str, now: datetime) -> dict[str, Any]:
        """Headers of a retry that uses no attempt; the first deferral's time is kept."""
        headers = self._failure_headers(reason_class, reason, now)
        headers[t.H_ATTEMPT] = self.attempt
        headers.setdefault(t.H_DEFERRED_SINCE, now.isoformat())
        return headers

    def deferred_since(self) -> datetime | None:
        value = _text(self.headers.get(t.H_DEFERRED_SINCE))
        try:
            since = datetime.fromisoformat(value) if value else None
        except ValueError:
            return None
        # A header is input: a time without its zone is not one this side wrote.
        return since if since is not None and since.tzinfo is not None else None

    def dead_letter_headers(self, reason_class: str, reason: str, now: datetime, saga_id: str | None) -> dict[str, Any]:
        headers = self._failure_headers(reason_class, reason, now)
        headers[t.H_ATTEMPT] = self.attempt
        if saga_id:
            headers[t.H_SAGA_ID] = saga_id
        return headers

    @abc.abstractmethod
    async def ack(self) -> None:
        """Acknowledge: the effect is committed, the broker may forget the message."""

    @abc.abstractmethod
    async def retry(self, delay_ms: int, expiration_ms: int, headers: Mapping[str, Any]) -> None:
        """Park a copy in the delay queue for `delay_ms`, confirmed, then ack this one."""

    @abc.abstractmethod
    async def dead_letter(self, headers: Mapping[str, Any]) -> None:
        """Publish a copy to `<queue>.dlq` with its reason, confirmed, then ack this one."""


DeliveryHandler = Callable[[Delivery], Awaitable[None]]


class Subscription(Protocol):
    async def stop(self, grace_seconds: float) -> None:
        """Stop taking deliveries and wait (bounded) for the in-flight ones to finish."""
        ...


class Transport(Publisher, Protocol):
    async def declare_topology(self) -> None: ...

    async def consume(self, queue: QueueSpec, handler: DeliveryHandler, prefetch: int) -> Subscription: ...

    async def close(self) -> None: ...
