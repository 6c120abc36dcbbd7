"""The relay between the real PostgreSQL outbox and the real RabbitMQ.

What is committed is published byte for byte; what is rolled back never leaves. A
relay that dies after the broker confirmed but before it marked the rows re-publishes
them, and the consumer's inbox turns that second copy into a no-op. Two relays on one
outbox publish everything, and each saga's messages reach the queue in commit order.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import pytest
from sqlalchemy import delete, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from contracts import Message, ReserveStock, StockLine, encode
from infra.clock import SystemClock
from infra.db import create_engine
from infra.pipeline import MessageProcessor
from infra.schema import upgrade
from infra.topology import STOCK_COMMANDS
from infra.transport.rabbit import RabbitTransport
from outbox.notify import OutboxListener
from outbox.ports import OutgoingMessage, Publisher
from outbox.relay import Relay
from outbox.tables import tables_for
from outbox.uow import UnitOfWork, pending_summary
from tests.harness.servers import Server, Servers
from tests.integration.support import applied_rows, effects, record_reservation
from tests.support import CuttableLink, eventually

pytestmark = pytest.mark.integration

PRODUCER = "saga"  # the orchestrator sends stock commands through its own outbox
CONSUMER = "stock"
clock = SystemClock()


@pytest.fixture(scope="module")
async def pg_engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """Like conftest's ``pg_engine``, but its database outlives a server restart in between.

    A test below restarts PostgreSQL. ``scratch_database`` keeps its admin connection in
    a pool from CREATE DATABASE to DROP DATABASE, and the restart kills it; this fixture
    opens a fresh admin connection for each.
    """
    server = make_url(database_url)
    name = f"it_test_relay_{uuid.uuid4().hex[:8]}"

    async def as_admin(statement: str) -> None:
        admin = create_async_engine(server, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        try:
            async with admin.connect() as connection:
                await connection.execute(text(statement))
        finally:
            await admin.dispose()

    await as_admin(f'CREATE DATABASE "{name}"')
    engine = create_engine(server.set(database=name).render_as_string(hide_password=False))
    try:
        await upgrade(engine)
        yield engine
    finally:
        await engine.dispose()
        await as_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(autouse=True)
async def empty_tables(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        await connection.execute(delete(tables_for(PRODUCER).outbox))
        await connection.execute(delete(tables_for(CONSUMER).inbox))
        await connection.execute(delete(effects))


def reserve(order_id: str, seq: int = 1) -> ReserveStock:
    """A reservation whose quantity doubles as its position within the saga."""
    return ReserveStock(order_id=order_id, lines=(StockLine(sku="sku-1", quantity=seq),))


def stock_processor(engine: AsyncEngine) -> MessageProcessor:
    return MessageProcessor(engine, CONSUMER, CONSUMER, {"stock.reserve": record_reservation}, clock)


async def commit(engine: AsyncEngine, plan: Sequence[tuple[str, int]]) -> list[Message[ReserveStock]]:
    """Send one reservation per (order id, seq) in a single committed unit of work."""
    async with UnitOfWork(engine, PRODUCER, clock) as uow:
        sent = [uow.send(reserve(order_id, seq), correlation_id=order_id) for order_id, seq in plan]
        await uow.commit()
    return sent


async def pending(engine: AsyncEngine) -> int:
    return (await pending_summary(engine, PRODUCER, clock.now()))["pending"]


async def inbox_count(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        inbox = tables_for(CONSUMER).inbox
        return (await connection.execute(select(func.count()).select_from(inbox))).scalar_one()


class RelayKilled(Exception):
    """Stands for the relay process dying at this point."""


class DiesAfterConfirm:
    """Publish for real and wait for the confirms, then die before the rows are marked."""

    def __init__(self, transport: Publisher) -> None:
        self.transport = transport

    async def publish_batch(self, messages: Sequence[OutgoingMessage]) -> None:
        await self.transport.publish_batch(messages)
        raise RelayKilled("killed after the broker confirmed, before marking the rows sent")


class HangsMidBatch:
    """Publish (confirmed) the first part of a batch, then hang until cancelled."""

    def __init__(self, transport: Publisher, publish_first: int) -> None:
        self.transport = transport
        self.publish_first = publish_first
        self.published_part = asyncio.Event()

    async def publish_batch(self, messages: Sequence[OutgoingMessage]) -> None:
        await self.transport.publish_batch(messages[: self.publish_first])
        self.published_part.set()
        await asyncio.Event().wait()


class SlowLink:
    """A relay's slow link to the broker: it holds its claimed rows a while before publishing.

    This is latency injected on purpose, not a wait for a condition: it gives the other
    relay time to claim and publish later rows of the same sagas, if it were allowed to.
    """

    def __init__(self, transport: Publisher, latency_seconds: float) -> None:
        self.transport = transport
        self.latency_seconds = latency_seconds

    async def publish_batch(self, messages: Sequence[OutgoingMessage]) -> None:
        await asyncio.sleep(self.latency_seconds)
        await self.transport.publish_batch(messages)


async def test_committed_message_is_published_exactly_as_committed_and_a_rolled_back_one_never(
    engine: AsyncEngine, rabbit: RabbitTransport, amqp_channel: aio_pika.abc.AbstractChannel
) -> None:
    [committed] = await commit(engine, [("order-1", 1)])
    async with UnitOfWork(engine, PRODUCER, clock) as uow:
        rolled_back = uow.send(reserve("order-2"), correlation_id="order-2")
        await uow.flush_outbox()  # inserted, then rolled back: leaving without commit
    [marker] = await commit(engine, [("order-3", 1)])
    received: list[aio_pika.abc.AbstractIncomingMessage] = []

    async def keep(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        received.append(message)

    queue = await amqp_channel.get_queue(STOCK_COMMANDS.name)
    await queue.consume(keep, no_ack=True)

    assert await Relay(engine, PRODUCER, rabbit, clock).drain() == 2

    await eventually(lambda: any(m.message_id == str(marker.message_id) for m in received))
    assert [m.message_id for m in received] == [str(committed.message_id), str(marker.message_id)]
    assert str(rolled_back.message_id) not in {m.message_id for m in received}
    first = received[0]
    assert first.body == encode(committed.envelope)
    assert first.message_id == str(committed.message_id)
    assert first.type == "stock.reserve"
    assert first.correlation_id == "order-1"
    assert first.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert first.content_type == "application/json"
    assert first.exchange == "compensa.commands"
    assert first.routing_key == "stock.reserve"
    assert await pending(engine) == 0


async def test_relay_killed_between_confirm_and_mark_republishes_and_the_effect_applies_once(
    engine: AsyncEngine, rabbit: RabbitTransport, consume: Any, depth: Any
) -> None:
    [message] = await commit(engine, [("order-1", 1)])

    with pytest.raises(RelayKilled):
        await Relay(engine, PRODUCER, DiesAfterConfirm(rabbit), clock).relay_once()
    assert await pending(engine) == 1

    assert await Relay(engine, PRODUCER, rabbit, clock).drain() == 1
    assert await pending(engine) == 0
    assert await depth(STOCK_COMMANDS.name) == 2  # confirmed publishes are queued

    processor = stock_processor(engine)
    await consume(processor, prefetch=10)

    await eventually(lambda: processor.processed + processor.duplicates == 2)
    assert (processor.processed, processor.duplicates) == (1, 1)
    assert [row.message_id for row in await applied_rows(engine)] == [str(message.message_id)]
    assert await inbox_count(engine) == 1


async def test_relay_task_cancelled_mid_batch_leaves_rows_pending_and_each_effect_applies_once(
    engine: AsyncEngine, rabbit: RabbitTransport, consume: Any, depth: Any
) -> None:
    messages = await commit(engine, [(f"order-{n}", 1) for n in range(4)])
    hanging = HangsMidBatch(rabbit, publish_first=2)
    relay_task = asyncio.create_task(Relay(engine, PRODUCER, hanging, clock).relay_once())

    await eventually(hanging.published_part.is_set, message="first half of the batch published")
    relay_task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await relay_task
    assert await pending(engine) == 4

    assert await Relay(engine, PRODUCER, rabbit, clock).drain() == 4
    assert await depth(STOCK_COMMANDS.name) == 6

    processor = stock_processor(engine)
    await consume(processor, prefetch=10)

    await eventually(lambda: processor.processed + processor.duplicates == 6)
    assert (processor.processed, processor.duplicates) == (4, 2)
    rows = await applied_rows(engine)
    assert sorted(row.message_id for row in rows) == sorted(str(m.message_id) for m in messages)


class RecordingLink:
    """A publisher that only records what the relay handed it, in order."""

    def __init__(self) -> None:
        self.published: list[OutgoingMessage] = []

    async def publish_batch(self, messages: Sequence[OutgoingMessage]) -> None:
        self.published.extend(messages)


async def test_a_relay_never_publishes_past_a_row_of_the_same_saga_another_relay_holds(
    engine: AsyncEngine,
) -> None:
    # seq 1..3 of one saga plus another saga's row, each in its own commit.
    first, second, third = [await commit(engine, [("order-1", seq)]) for seq in (1, 2, 3)]
    [other] = await commit(engine, [("order-2", 1)])
    outbox = tables_for(PRODUCER).outbox
    link = RecordingLink()
    relay = Relay(engine, PRODUCER, link, clock)
    async with engine.connect() as holder, holder.begin():
        # Another relay has claimed seq 2 (and dropped or not yet published it):
        # SKIP LOCKED hands this relay seq 1 and seq 3 with a gap between them.
        await holder.execute(select(outbox.c.id).where(outbox.c.message_id == str(second[0].message_id)).with_for_update())
        assert await relay.relay_once() == 2
        assert [m.message_id for m in link.published] == [str(first[0].message_id), str(other.message_id)]
    # Once seq 2 is free again, seq 2 and 3 follow in order.
    assert await relay.drain() == 2
    assert [m.message_id for m in link.published[2:]] == [str(second[0].message_id), str(third[0].message_id)]
    assert await pending(engine) == 0


async def test_two_relays_on_one_outbox_publish_every_message_in_commit_order_per_saga(
    engine: AsyncEngine, rabbit: RabbitTransport, amqp_url: str, consume: Any
) -> None:
    sagas = [f"order-{n:02d}" for n in range(50)]
    plan = [(saga, seq) for seq in range(1, 11) for saga in sagas]  # 500, seq 1..10 per saga
    committed: list[Message[ReserveStock]] = []
    for start in range(0, len(plan), 25):  # each saga's messages span many transactions
        committed += await commit(engine, plan[start : start + 25])
    # One consumer taking one message at a time sees the queue's order exactly. Record
    # that order on first arrival: a transient failure under load may retry a message
    # through a delay queue, which legitimately reorders *processing*, not publishing.
    processor = stock_processor(engine)
    arrivals: list[str] = []

    async def record_arrival(delivery: Any) -> None:
        if delivery.attempt == 1 and not delivery.redelivered:
            arrivals.append(delivery.message_id)
        await processor(delivery)

    await consume(record_arrival, prefetch=1)
    published: list[str] = []
    transports = [RabbitTransport(amqp_url), RabbitTransport(amqp_url)]
    # Batches of 40 over 50 sagas: two batches in flight always share sagas, and the slow
    # relay holds its rows long enough for the fast one to overtake it if it were allowed.
    links = [SlowLink(transports[0], latency_seconds=0.02), transports[1]]
    relays = [
        Relay(
            engine,
            PRODUCER,
            link,
            clock,
            batch_size=40,
            poll_seconds=0.02,
            on_published=lambda batch: published.extend(m.message_id for m in batch),
        )
        for link in links
    ]
    stop = asyncio.Event()

    async def drained() -> bool:
        return await pending(engine) == 0

    running = [asyncio.create_task(relay.run(stop)) for relay in relays]
    try:
        await eventually(drained, timeout=30, message="outbox drained")
    finally:
        stop.set()
        await asyncio.gather(*running)
        for transport in transports:
            await transport.close()

    assert set(published) == {str(m.message_id) for m in committed}
    assert all(relay.published_total > 0 for relay in relays), "both relays took part"
    await eventually(lambda: processor.processed == len(committed), timeout=30)
    rows = await applied_rows(engine)
    assert len(rows) == len({row.message_id for row in rows}) == len(committed)
    seq_of = {str(m.message_id): (m.payload.order_id, m.payload.lines[0].quantity) for m in committed}
    for saga in sagas:
        arrived = [seq for order_id, seq in (seq_of[i] for i in arrivals if i in seq_of) if order_id == saga]
        assert arrived == list(range(1, 11)), saga


# ------------------------------------------------------------------ after outages

#: Long enough that only a NOTIFY (or the listener's wake-up after reconnecting) can
#: explain a publish within a few seconds.
LONG_POLL_SECONDS = 30.0


class CountingLink:
    """Count the relay's publish attempts, then hand each batch on (a port wrapper)."""

    def __init__(self, transport: Publisher) -> None:
        self.transport = transport
        self.attempts = 0

    async def publish_batch(self, messages: Sequence[OutgoingMessage]) -> None:
        self.attempts += 1
        await self.transport.publish_batch(messages)


class RunningRelay:
    """A relay with its own LISTEN wake-up, run as tasks until ``stop()``."""

    def __init__(self, relay: Relay, listener: OutboxListener) -> None:
        self.relay = relay
        self.listener = listener
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(relay.run(self._stop)), asyncio.create_task(listener.run(self._stop))]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def drained(engine: AsyncEngine) -> bool:
    return await pending(engine) == 0


def published_ids(link: RecordingLink) -> set[str]:
    return {m.message_id for m in link.published}


async def publish_latency(link: RecordingLink, message: Message[ReserveStock], timeout: float) -> float:
    """Seconds from now until the relay handed ``message`` to its publisher."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    await eventually(
        lambda: str(message.message_id) in published_ids(link),
        timeout=timeout,
        interval=0.005,
        message=f"{message.message_id} published",
    )
    return loop.time() - started


@pytest.fixture
async def postgres_server(servers: Servers, engine: AsyncEngine) -> AsyncIterator[Server]:
    """The session's PostgreSQL, which the test may stop and start; running and ready afterwards.

    Other tests share the server: it is started again (start() waits until it accepts
    connections) and the module's engine drops its dead pooled connections.
    """
    server = servers.postgres
    if not server.controllable:
        pytest.skip(f"restarting PostgreSQL needs the harness's own server; this one is from {server.origin}")
    try:
        yield server
    finally:
        if not server.running:
            await asyncio.to_thread(server.start)
        await engine.dispose()


async def test_after_a_postgres_restart_the_relay_listens_again_and_publishes_without_waiting_for_its_poll(
    engine: AsyncEngine, postgres_server: Server
) -> None:
    link = RecordingLink()
    # A relay caught mid-claim by the shutdown backs off; keep that short so the latency
    # measured below is the listener's, not the relay's database-failure backoff.
    relay = Relay(engine, PRODUCER, link, clock, poll_seconds=LONG_POLL_SECONDS, retry_base_seconds=0.05, retry_max_seconds=0.1)
    listener = OutboxListener(engine, {PRODUCER: relay})
    running = RunningRelay(relay, listener)
    try:
        await eventually(listener.listening.is_set, message="listening")
        [before] = await commit(engine, [("order-1", 1)])
        assert await publish_latency(link, before, timeout=3) < 1.0
        await eventually(lambda: drained(engine), message="marked sent before the restart")

        await asyncio.to_thread(postgres_server.stop)  # fast shutdown, like pg_ctl restart -m fast
        await eventually(lambda: not listener.listening.is_set(), message="the lost connection noticed")
        await asyncio.to_thread(postgres_server.start)  # returns once the server accepts connections
        await eventually(
            lambda: listener.sessions == 2 and listener.listening.is_set(),
            timeout=10,
            message="listening again after the restart",
        )

        [after] = await commit(engine, [("order-2", 1)])
        latency = await publish_latency(link, after, timeout=3)
        assert latency < 1.0, f"published {latency:.3f}s after commit; poll is {LONG_POLL_SECONDS}s"
    finally:
        await running.stop()
    assert await pending(engine) == 0


async def test_rows_committed_while_the_listener_was_cut_off_are_published_as_soon_as_it_listens_again(
    engine: AsyncEngine,
) -> None:
    url = make_url(engine.url.render_as_string(hide_password=False))
    cuttable = await CuttableLink(url.host or "127.0.0.1", url.port or 5432).start()
    listen_engine = create_engine(url.set(host="127.0.0.1", port=cuttable.port).render_as_string(hide_password=False))
    link = RecordingLink()
    relay = Relay(engine, PRODUCER, link, clock, poll_seconds=LONG_POLL_SECONDS)
    listener = OutboxListener(listen_engine, {PRODUCER: relay})
    running = RunningRelay(relay, listener)
    try:
        await eventually(listener.listening.is_set, message="listening")
        await cuttable.cut()
        await eventually(lambda: not listener.listening.is_set(), message="the cut noticed")
        # Its NOTIFY reaches nobody: only the wake-up after reconnecting can publish it soon.
        [missed] = await commit(engine, [("order-1", 1)])
        await cuttable.restore()
        assert await publish_latency(link, missed, timeout=5) < 4.0
        assert listener.sessions == 2
    finally:
        await running.stop()
        await cuttable.close()
        await listen_engine.dispose()
    assert await pending(engine) == 0


class Silenceable:
    """Open connections of a FreezableLink; silenced ones carry no more bytes."""

    def __init__(self) -> None:
        self.silenced = False


class FreezableLink:
    """A TCP link to a real server whose open connections can go silent without closing.

    That is a peer that vanished (a host power loss, a dropped route): no FIN, no RST,
    nothing for a termination callback to see. Connections opened afterwards work.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._connections: list[Silenceable] = []
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> FreezableLink:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def silence_open_connections(self) -> None:
        for connection in self._connections:
            connection.silenced = True

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection(*self.target)
        connection = Silenceable()
        self._connections.append(connection)
        self._writers += [client_writer, server_writer]

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    if not connection.silenced:
                        writer.write(data)
                        await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()

        await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer))


async def test_a_listening_connection_that_went_silent_is_noticed_by_the_liveness_check_and_replaced(
    engine: AsyncEngine,
) -> None:
    url = make_url(engine.url.render_as_string(hide_password=False))
    freezable = await FreezableLink(url.host or "127.0.0.1", url.port or 5432).start()
    listen_engine = create_engine(url.set(host="127.0.0.1", port=freezable.port).render_as_string(hide_password=False))
    link = RecordingLink()
    relay = Relay(engine, PRODUCER, link, clock, poll_seconds=LONG_POLL_SECONDS)
    listener = OutboxListener(listen_engine, {PRODUCER: relay}, check_seconds=0.5)
    running = RunningRelay(relay, listener)
    try:
        await eventually(listener.listening.is_set, message="listening")
        freezable.silence_open_connections()
        # Its NOTIFY is swallowed by the silent link, and no callback says the link is dead.
        [missed] = await commit(engine, [("order-1", 1)])
        # About check_seconds to notice (plus as long for the check to time out), then reconnect.
        assert await publish_latency(link, missed, timeout=5) < 3.0
        assert listener.sessions == 2
    finally:
        await running.stop()
        await listen_engine.dispose()
        await freezable.close()
    assert await pending(engine) == 0


async def test_during_a_broker_outage_the_relay_retries_on_its_backoff_schedule_not_on_every_notify(
    engine: AsyncEngine, rabbit: RabbitTransport, amqp_url: str, depth: Any
) -> None:
    broker = urlsplit(amqp_url)
    cuttable = await CuttableLink(broker.hostname or "127.0.0.1", broker.port or 5672).start()
    await cuttable.cut()  # the broker refuses connections from now on
    through_link = amqp_url.replace(f"@{broker.hostname}:{broker.port}/", f"@127.0.0.1:{cuttable.port}/", 1)
    assert through_link != amqp_url
    transport = RabbitTransport(through_link)
    counting = CountingLink(transport)
    # Backoff 0.25-0.5, 0.5-1, 1-2, 2-4, 2-4 s...: at most 5 attempts in 5 s.
    relay = Relay(engine, PRODUCER, counting, clock, retry_base_seconds=0.5, retry_max_seconds=4.0)
    listener = OutboxListener(engine, {PRODUCER: relay})
    running = RunningRelay(relay, listener)
    loop = asyncio.get_running_loop()
    committed: list[Message[ReserveStock]] = []
    try:
        await eventually(listener.listening.is_set, message="listening")
        heard = listener.notifications
        outage_ends = loop.time() + 5.0
        while loop.time() < outage_ends:
            # 20 orders/s, each commit a NOTIFY: the paced workload, not a wait for a condition.
            committed += await commit(engine, [(f"order-{len(committed)}", 1)])
            await asyncio.sleep(0.05)
        attempts = counting.attempts
        assert listener.notifications - heard >= 50, "the wake-ups did arrive"
        assert 2 <= attempts <= 6, f"{attempts} publish attempts during a 5 s outage with {len(committed)} NOTIFYs"

        await cuttable.restore()
        await eventually(
            lambda: relay.published_total == len(committed), timeout=10, message="everything published once the broker is back"
        )
        assert await depth(STOCK_COMMANDS.name) == len(committed)
        assert await pending(engine) == 0
    finally:
        await running.stop()
        await transport.close()
        await cuttable.close()
