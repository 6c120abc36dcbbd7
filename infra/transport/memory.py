"""An in-memory broker with RabbitMQ's at-least-once semantics, for tests and the simulator.

It implements the same Transport port as the RabbitMQ adapter: exchanges with
bindings, durable-looking work queues, unacked deliveries that return to the queue
(flagged redelivered) when not acknowledged, delay queues that dead-letter back
after their TTL, and `<queue>.dlq`. Time comes from the injected clock, so a
simulation decides when delayed messages come due. It can restart (`restart`): what
was delivered and not acknowledged returns to its queue, channels opened before are
closed, and publishes go unconfirmed until it is back, as with RabbitMQ.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from contracts import TransientError
from contracts.clock import Clock
from contracts.routing import COMMANDS_EXCHANGE, DEFAULT_EXCHANGE
from infra import topology as t
from infra.topology import QueueSpec
from infra.transport.base import Delivery, DeliveryHandler
from outbox.ports import OutgoingMessage


@dataclass
class StoredMessage:
    body: bytes
    headers: dict[str, Any]
    message_id: str | None
    exchange: str
    routing_key: str
    correlation_id: str | None = None
    redelivered: bool = False
    delivery_tag: int = 0


@dataclass
class BrokerStats:
    published: int = 0
    unrouted_events: int = 0
    delivered: int = 0
    acked: int = 0
    requeued: int = 0
    retried: int = 0
    dead_lettered: int = 0
    restarts: int = 0
    #: Unacked deliveries a restart gave back to their queues.
    returned_on_restart: int = 0
    published_ids: set[str] = field(default_factory=set)
    settled_ids: set[str] = field(default_factory=set)  # acked at least once
    unrouted_ids: set[str] = field(default_factory=set)
    dead_letter_reasons: dict[str, str] = field(default_factory=dict)


class MemoryDelivery(Delivery):
    def __init__(self, broker: MemoryBroker, queue: QueueSpec, stored: StoredMessage, *, ack_lost: bool = False) -> None:
        self._broker = broker
        #: The acknowledgement never reaches the broker (see MemoryBroker.lose_ack).
        self._ack_lost = ack_lost
        self._stored = stored
        #: The broker's life this delivery's channel belongs to (see `channel_closed`).
        self._epoch = broker.epoch
        self.queue = queue
        self.body = stored.body
        self.headers = dict(stored.headers)
        self.message_id = stored.message_id
        self.correlation_id = stored.correlation_id
        self.exchange = stored.exchange
        self.routing_key = stored.routing_key
        self.redelivered = stored.redelivered
        self.settled = False

    @property
    def channel_closed(self) -> bool:
        """The broker restarted since this was delivered: it cannot be settled, the broker has it back."""
        return self._epoch != self._broker.epoch

    def _check_channel(self, operation: str) -> None:
        if self.channel_closed:
            raise TransientError(f"{operation} failed: the channel closed when the broker restarted")

    async def ack(self) -> None:
        self._check_channel("ack")
        if self._ack_lost:
            await self.requeue()
            return
        self._settle()
        self._broker.stats.acked += 1
        if self.message_id:
            self._broker.stats.settled_ids.add(self.message_id)

    async def requeue(self) -> None:
        """Give the delivery back unacknowledged, as a lost connection would."""
        self._settle()
        if not self.channel_closed:  # else the restart gave it back already
            self._broker.requeue(self.queue.name, self._stored)

    async def retry(self, delay_ms: int, expiration_ms: int, headers: Mapping[str, Any]) -> None:
        self._check_channel("retry")
        copy = StoredMessage(self.body, dict(headers), self.message_id, "", self.queue.delay_queue(delay_ms), self.correlation_id)
        self._broker.delay(self.queue.name, copy, min(delay_ms, expiration_ms))
        self._broker.stats.retried += 1
        await self.ack()

    async def dead_letter(self, headers: Mapping[str, Any]) -> None:
        self._check_channel("dead letter")
        copy = StoredMessage(self.body, dict(headers), self.message_id, t.DLX.name, self.queue.name, self.correlation_id)
        self._broker.queues[self.queue.dlq].append(copy)
        self._broker.stats.dead_lettered += 1
        if self.message_id:
            self._broker.stats.dead_letter_reasons[self.message_id] = str(headers.get(t.H_REASON, ""))
        await self.ack()

    def _settle(self) -> None:
        if self.settled:
            raise RuntimeError(f"delivery {self.message_id} settled twice")
        self.settled = True
        self._broker.unacked.pop(self._stored.delivery_tag, None)


class MemorySubscription:
    def __init__(self, task: asyncio.Task[None], stop: asyncio.Event) -> None:
        self._task = task
        self._stop = stop

    async def stop(self, grace_seconds: float) -> None:
        self._stop.set()
        await asyncio.wait({self._task}, timeout=grace_seconds)
        if not self._task.done():
            self._task.cancel()


class MemoryBroker:
    """A deterministic broker: the caller (or a consume loop) decides what is delivered when."""

    def __init__(self, clock: Clock, *, queues: Sequence[QueueSpec] = t.WORK_QUEUES) -> None:
        self.clock = clock
        self.specs = {q.name: q for q in queues}
        #: Queues consumed that are not work queues (the dead-letter archive reads `<queue>.dlq`).
        self.other_specs: dict[str, QueueSpec] = {}
        self.queues: dict[str, deque[StoredMessage]] = {}
        self.bindings: dict[tuple[str, str], list[str]] = {}
        self.unacked: dict[int, tuple[str, StoredMessage]] = {}
        self._delayed: list[tuple[Any, int, str, StoredMessage]] = []
        self._tags = itertools.count(1)
        self._seq = itertools.count()
        #: Incremented by each restart: channels of an earlier life are closed.
        self.epoch = 0
        #: While the broker restarts, until when (None: it is up).
        self.down_until: datetime | None = None
        self.stats = BrokerStats()
        self.arrived = asyncio.Event()
        self.declare_topology_now()

    # ------------------------------------------------------------ topology

    def declare_topology_now(self) -> None:
        for spec in self.specs.values():
            self.queues.setdefault(spec.name, deque())
            self.queues.setdefault(spec.dlq, deque())
            for key in spec.routing_keys:
                bound = self.bindings.setdefault((spec.exchange.name, key), [])
                if spec.name not in bound:
                    bound.append(spec.name)

    async def declare_topology(self) -> None:
        self.declare_topology_now()

    async def close(self) -> None:
        return None

    # ------------------------------------------------------------ publish

    @property
    def available(self) -> bool:
        """Whether the broker is up: it confirms publishes and delivers."""
        if self.down_until is not None and self.clock.now() >= self.down_until:
            self.down_until = None
        return self.down_until is None

    def restart(self, seconds: float) -> int:
        """Restart now, away for `seconds`: every unacked delivery returns to the head of
        its queue, flagged redelivered, in the order it was delivered, and every channel
        opened before is closed. Return how many deliveries returned."""
        self.epoch += 1
        self.down_until = self.clock.now() + timedelta(seconds=seconds)
        returned = sorted(self.unacked.items())
        self.unacked.clear()
        for _tag, (queue, stored) in reversed(returned):
            self.requeue(queue, stored)
        self.stats.restarts += 1
        self.stats.returned_on_restart += len(returned)
        return len(returned)

    async def publish_batch(self, messages: Sequence[OutgoingMessage]) -> None:
        if not self.available:
            raise TransientError(f"publish not confirmed: the broker is restarting (back at {self.down_until})")
        for message in messages:
            self.publish_one(message)

    def publish_one(self, message: OutgoingMessage) -> None:
        if message.exchange == DEFAULT_EXCHANGE:
            # The default exchange routes to the queue the routing key names (replays).
            targets = [message.routing_key] if message.routing_key in self.queues else []
        else:
            targets = self.bindings.get((message.exchange, message.routing_key), [])
        if not targets:
            if message.exchange in (COMMANDS_EXCHANGE, DEFAULT_EXCHANGE):
                raise TransientError(f"{message.type} to {message.exchange or 'queue'} {message.routing_key} is unroutable")
            self.stats.unrouted_events += 1
            self.stats.unrouted_ids.add(message.message_id)
        self.stats.published += 1
        self.stats.published_ids.add(message.message_id)
        for queue in targets:
            self.queues[queue].append(
                StoredMessage(
                    message.body,
                    dict(message.headers),
                    message.message_id,
                    message.exchange,
                    message.routing_key,
                    message.correlation_id,
                )
            )
        self.arrived.set()

    # ------------------------------------------------------------ deliver

    def requeue(self, queue: str, stored: StoredMessage) -> None:
        stored.redelivered = True
        self.queues[queue].appendleft(stored)
        self.stats.requeued += 1
        self.arrived.set()

    def delay(self, queue: str, stored: StoredMessage, delay_ms: int) -> None:
        due = self.clock.now() + timedelta(milliseconds=delay_ms)
        heapq.heappush(self._delayed, (due, next(self._seq), queue, stored))

    def next_due(self) -> Any:
        return self._delayed[0][0] if self._delayed else None

    def release_due(self) -> int:
        """Move delayed messages whose time has come back to their work queues."""
        now = self.clock.now()
        released = 0
        while self._delayed and self._delayed[0][0] <= now:
            _, _, queue, stored = heapq.heappop(self._delayed)
            self.queues[queue].append(stored)
            released += 1
        if released:
            self.arrived.set()
        return released

    def duplicate(self, delivery: MemoryDelivery) -> None:
        """Put a second copy of a delivered message in its queue, as a broker may."""
        original = delivery._stored
        copy = StoredMessage(
            original.body,
            dict(original.headers),
            original.message_id,
            original.exchange,
            original.routing_key,
            original.correlation_id,
            redelivered=True,
        )
        self.queues[delivery.queue.name].append(copy)

    def lose_ack(self, delivery: MemoryDelivery) -> MemoryDelivery:
        """The same delivery, but its acknowledgement is lost on the way (or the consumer
        crashed after its commit): settling it gives the message back, redelivered."""
        lost = MemoryDelivery(self, delivery.queue, delivery._stored, ack_lost=True)
        lost._epoch = delivery._epoch
        return lost

    def hold(self, delivery: MemoryDelivery, seconds: float) -> None:
        """Keep a delivery in transit for a while; it reaches its queue again later."""
        delivery._settle()
        self.delay(delivery.queue.name, delivery._stored, int(seconds * 1000))

    def work_depth(self) -> int:
        return sum(len(self.queues[name]) for name in self.specs)

    def depth(self, queue: str) -> int:
        return len(self.queues[queue])

    def delayed_count(self) -> int:
        return len(self._delayed)

    def get(self, queue: str, index: int = 0) -> MemoryDelivery | None:
        """Take the message at `index` (0 = head) off the queue as an unacked delivery (none while restarting)."""
        waiting = self.queues[queue]
        if not waiting or not self.available:
            return None
        if index:
            waiting.rotate(-index)
            stored = waiting.popleft()
            waiting.rotate(index)
        else:
            stored = waiting.popleft()
        stored.delivery_tag = next(self._tags)
        self.unacked[stored.delivery_tag] = (queue, stored)
        self.stats.delivered += 1
        return MemoryDelivery(self, self.specs.get(queue) or self.other_specs[queue], stored)

    def dead_letters(self, queue: str) -> list[StoredMessage]:
        return list(self.queues[self.specs[queue].dlq])

    # ------------------------------------------------------------ consume (real time)

    async def consume(self, queue: QueueSpec, handler: DeliveryHandler, prefetch: int = 1) -> MemorySubscription:
        stop = asyncio.Event()
        if queue.name not in self.specs:
            self.other_specs[queue.name] = queue
            self.queues.setdefault(queue.name, deque())

        async def loop() -> None:
            while not stop.is_set():
                self.release_due()
                delivery = self.get(queue.name)
                if delivery is None:
                    self.arrived.clear()
                    waiters = {asyncio.ensure_future(self.arrived.wait()), asyncio.ensure_future(stop.wait())}
                    await asyncio.wait(waiters, timeout=0.05, return_when=asyncio.FIRST_COMPLETED)
                    for waiter in waiters:
                        waiter.cancel()
                    continue
                try:
                    await handler(delivery)
                finally:
                    if not delivery.settled:
                        await delivery.requeue()

        return MemorySubscription(asyncio.create_task(loop(), name=f"consume:{queue.name}"), stop)
