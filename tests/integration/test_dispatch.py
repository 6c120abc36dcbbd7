"""Dispatch after commit, on the real PostgreSQL and RabbitMQ.

The process that committed publishes its rows at once and marks them sent; the relay
takes only what the dispatcher missed: rows whose lease ended (the process died between
commit and publish), rows released after a failed publish, and the rows of a saga that
already had a pending row elsewhere, which must not be overtaken.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import aio_pika
import pytest
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts import Message, ReserveStock, StockLine, TransientError
from infra.clock import SystemClock
from infra.topology import STOCK_COMMANDS
from infra.transport.rabbit import RabbitTransport
from outbox.dispatch import Dispatcher
from outbox.ports import OutgoingMessage, Publisher
from outbox.relay import Relay
from outbox.tables import tables_for
from outbox.uow import UnitOfWork, pending_summary
from tests.support import eventually

pytestmark = pytest.mark.integration

PRODUCER = "saga"
clock = SystemClock()
outbox = tables_for(PRODUCER).outbox


@pytest.fixture(autouse=True)
async def empty_outbox(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        await connection.execute(delete(outbox))


@pytest.fixture
async def received(amqp_channel: aio_pika.abc.AbstractChannel) -> list[str]:
    """Message ids in the order they reach the stock command queue."""
    arrivals: list[str] = []

    async def keep(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        arrivals.append(message.message_id or "")

    queue = await amqp_channel.get_queue(STOCK_COMMANDS.name)
    await queue.purge()
    await queue.consume(keep, no_ack=True)
    return arrivals


def reserve(order_id: str, seq: int = 1) -> ReserveStock:
    return ReserveStock(order_id=order_id, lines=(StockLine(sku="sku-1", quantity=seq),))


async def commit(engine: AsyncEngine, order_id: str, seq: int, dispatcher: Dispatcher | None) -> Message[ReserveStock]:
    async with UnitOfWork(engine, PRODUCER, clock, dispatcher=dispatcher) as uow:
        message = uow.send(reserve(order_id, seq), correlation_id=order_id)
        await uow.commit()
    return message


async def row_of(engine: AsyncEngine, message: Message[Any]) -> Any:
    async with engine.connect() as connection:
        return (await connection.execute(select(outbox).where(outbox.c.message_id == str(message.message_id)))).one()


async def pending(engine: AsyncEngine) -> int:
    return (await pending_summary(engine, PRODUCER, clock.now()))["pending"]


class NeverPublishes:
    """A process that dies between its commit and its publish: nothing reaches the broker."""

    def __init__(self) -> None:
        self.handed: list[OutgoingMessage] = []

    async def publish_batch(self, messages: Sequence[OutgoingMessage]) -> None:
        self.handed.extend(messages)
        await asyncio.Event().wait()


class BrokerDown:
    def __init__(self) -> None:
        self.attempts = 0

    async def publish_batch(self, messages: Sequence[OutgoingMessage]) -> None:
        self.attempts += 1
        raise TransientError("publish failed: connection refused")


def dispatcher(engine: AsyncEngine, publisher: Publisher, lease_seconds: float = 10.0) -> Dispatcher:
    return Dispatcher(engine, PRODUCER, publisher, clock, lease=timedelta(seconds=lease_seconds), cooldown_seconds=60)


async def test_a_commit_is_published_at_once_by_its_process_and_marked_sent_without_a_relay(
    engine: AsyncEngine, rabbit: RabbitTransport, received: list[str]
) -> None:
    publisher = dispatcher(engine, rabbit)
    messages = [await commit(engine, f"order-{n}", 1, publisher) for n in range(5)]

    await eventually(lambda: len(received) == 5, message="all five published with no relay running")
    assert received == [str(m.message_id) for m in messages]
    await eventually(lambda: publisher.published == 5)

    async def all_marked() -> bool:
        return await pending(engine) == 0

    await eventually(all_marked, message="every dispatched row marked sent")
    assert await Relay(engine, PRODUCER, rabbit, clock).drain() == 0
    await publisher.close()


async def test_a_row_whose_process_died_before_publishing_waits_for_its_lease_then_the_relay_sends_it(
    engine: AsyncEngine, rabbit: RabbitTransport, received: list[str]
) -> None:
    dying = NeverPublishes()
    publisher = dispatcher(engine, dying, lease_seconds=1.5)
    message = await commit(engine, "order-1", 1, publisher)
    await eventually(lambda: len(dying.handed) == 1, message="handed to the dispatcher after commit")
    row = await row_of(engine, message)
    assert row.sent_at is None
    assert row.dispatch_after is not None and row.dispatch_after > row.created_at

    relay = Relay(engine, PRODUCER, rabbit, clock)
    assert await relay.drain() == 0  # leased: the relay leaves it to its process

    async def relayed() -> bool:
        return await relay.drain() == 1

    await eventually(relayed, timeout=10, message="the relay publishes the row once its lease ended")
    await eventually(lambda: received == [str(message.message_id)])
    assert await pending(engine) == 0
    await publisher.close(timeout=0)


async def test_a_saga_with_a_row_pending_elsewhere_goes_through_the_relay_in_commit_order(
    engine: AsyncEngine, rabbit: RabbitTransport, received: list[str]
) -> None:
    publisher = dispatcher(engine, rabbit)
    # seq 1 was committed by a process without a dispatcher (the CLI, say): the relay's.
    first = await commit(engine, "order-1", 1, None)
    # seq 2 of the same saga must not overtake it, so it is left to the relay too.
    second = await commit(engine, "order-1", 2, publisher)
    # Another saga has nothing pending: dispatched at once.
    other = await commit(engine, "order-2", 1, publisher)

    await eventually(lambda: received == [str(other.message_id)], message="only the other saga dispatched")
    assert (await row_of(engine, second)).dispatch_after is None
    assert await Relay(engine, PRODUCER, rabbit, clock).drain() == 2
    await eventually(lambda: len(received) == 3)
    assert received[1:] == [str(first.message_id), str(second.message_id)]
    await publisher.close()


async def test_a_failed_publish_hands_its_rows_to_the_relay_at_once_and_the_next_commits_too(
    engine: AsyncEngine, rabbit: RabbitTransport, received: list[str]
) -> None:
    down = BrokerDown()
    publisher = dispatcher(engine, down)
    first = await commit(engine, "order-1", 1, publisher)
    await eventually(lambda: down.attempts == 1)

    async def released() -> bool:
        return (await row_of(engine, first)).dispatch_after is None

    await eventually(released, message="the failed row's lease released for the relay")
    assert not publisher.in_use
    second = await commit(engine, "order-2", 1, publisher)  # out of use: straight to the relay
    assert (await row_of(engine, second)).dispatch_after is None
    assert down.attempts == 1

    assert await Relay(engine, PRODUCER, rabbit, clock).drain() == 2
    await eventually(lambda: received == [str(first.message_id), str(second.message_id)])
    await publisher.close()


async def test_closing_publishes_what_was_committed_before_it_returns(
    engine: AsyncEngine, rabbit: RabbitTransport, received: list[str]
) -> None:
    publisher = dispatcher(engine, rabbit)
    messages = [await commit(engine, f"order-{n}", 1, publisher) for n in range(20)]
    await publisher.close()

    assert publisher.published == 20
    assert await pending(engine) == 0
    await eventually(lambda: len(received) == 20)
    assert received == [str(m.message_id) for m in messages]


class RecordingLink:
    """A broker that records what it is handed, in order."""

    def __init__(self) -> None:
        self.published: list[str] = []

    async def publish_batch(self, messages: Sequence[OutgoingMessage]) -> None:
        self.published.extend(m.message_id for m in messages)


async def test_on_sqlite_and_postgresql_dispatched_rows_are_marked_and_older_pending_rows_go_first(
    migrated: AsyncEngine,
) -> None:
    """The embedded default (SQLite takes its write lock at BEGIN) marks like PostgreSQL."""
    async with migrated.begin() as connection:
        await connection.execute(delete(outbox))
    link = RecordingLink()
    publisher = Dispatcher(migrated, PRODUCER, link, clock)
    dispatched = [await commit(migrated, f"order-{n}", 1, publisher) for n in range(3)]

    await eventually(lambda: len(link.published) == 3)

    async def all_marked() -> bool:
        return await pending_summary(migrated, PRODUCER, clock.now()) == {
            "service": PRODUCER,
            "pending": 0,
            "oldest_pending_age_seconds": 0.0,
        }

    await eventually(all_marked, message="dispatched rows marked sent")
    assert link.published == [str(m.message_id) for m in dispatched]

    first = await commit(migrated, "order-9", 1, None)  # the relay's: no dispatcher
    second = await commit(migrated, "order-9", 2, publisher)  # must not overtake it
    assert (await row_of(migrated, second)).dispatch_after is None
    relay_link = RecordingLink()
    assert await Relay(migrated, PRODUCER, relay_link, clock).drain() == 2
    assert relay_link.published == [str(first.message_id), str(second.message_id)]
    assert link.published == [str(m.message_id) for m in dispatched]
    await publisher.close()


class FailsWhenTold:
    """A broker link whose first publish hangs until told to fail."""

    def __init__(self) -> None:
        self.handed: list[str] = []
        self.fail = asyncio.Event()

    async def publish_batch(self, messages: Sequence[OutgoingMessage]) -> None:
        self.handed.extend(m.message_id for m in messages)
        await self.fail.wait()
        raise TransientError("publish failed: channel closed")


async def test_a_commit_granted_before_a_failed_publish_does_not_overtake_the_failed_row(
    engine: AsyncEngine,
) -> None:
    link = FailsWhenTold()
    publisher = dispatcher(engine, link)
    first = await commit(engine, "order-1", 1, publisher)
    await eventually(lambda: link.handed == [str(first.message_id)], message="the first row is being published")
    async with UnitOfWork(engine, PRODUCER, clock, dispatcher=publisher) as uow:
        second = uow.send(reserve("order-1", 2), correlation_id="order-1")
        await uow.flush_outbox()  # granted: the first row is on its way through this dispatcher
        link.fail.set()  # that publish fails while this unit of work is still open

        async def first_released() -> bool:
            return (await row_of(engine, first)).dispatch_after is None

        await eventually(first_released, message="the failed row released to the relay")
        await uow.commit()

    async def second_released() -> bool:
        return (await row_of(engine, second)).dispatch_after is None

    await eventually(second_released, message="the granted row released too, not published after the failure")
    assert link.handed == [str(first.message_id)]
    relay_link = RecordingLink()
    assert await Relay(engine, PRODUCER, relay_link, clock).drain() == 2
    assert relay_link.published == [str(first.message_id), str(second.message_id)]
    await publisher.close()


async def test_a_commit_that_lands_after_close_is_left_to_the_relay_at_once(engine: AsyncEngine, rabbit: RabbitTransport) -> None:
    publisher = dispatcher(engine, rabbit)
    async with UnitOfWork(engine, PRODUCER, clock, dispatcher=publisher) as uow:
        late = uow.send(reserve("order-1"), correlation_id="order-1")
        await uow.flush_outbox()  # granted while the dispatcher ran
        await publisher.close()  # the service stops meanwhile
        await uow.commit()

    async def released() -> bool:
        return (await row_of(engine, late)).dispatch_after is None

    await eventually(released, message="its lease released for the relays' final flush")
    assert publisher.published == 0
    assert await Relay(engine, PRODUCER, RecordingLink(), clock).drain() == 1
