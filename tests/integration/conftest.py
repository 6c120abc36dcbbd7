"""Fixtures for integration tests against the real PostgreSQL and RabbitMQ.

- ``pg_engine``: a fresh Postgres database per test module, migrated to head.
- ``engine``: ``pg_engine`` with the test participant's ``effects`` table (support.py);
  modules with other needs (ingest, health, the outbox contract) define their own.
- ``rabbit``: a RabbitTransport with the topology declared (fast retry delays) and the
  stock queues purged, so each test starts from empty queues.
- ``amqp_channel``: a raw aio-pika confirm channel, for publishing what compensa would
  never publish and for reading queues directly.
- ``consume``: start consumers on ``stock.commands``; they are stopped after the test.
- ``spans``: the process-wide in-memory span exporter, emptied for the test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import aio_pika
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy.ext.asyncio import AsyncEngine

from infra.db import create_engine, scratch_database
from infra.pipeline import RetryPolicy
from infra.schema import upgrade
from infra.telemetry.tracing import configure_tracing
from infra.topology import STOCK_COMMANDS, retry_delays_ms
from infra.transport.base import DeliveryHandler
from infra.transport.rabbit import RabbitSubscription, RabbitTransport
from tests.integration.support import effects_metadata

#: Small delays so a message retried to exhaustion takes well under a second.
RETRY_POLICY = RetryPolicy(max_attempts=4, base_seconds=0.05, max_seconds=1.0)
RETRY_DELAYS_MS = retry_delays_ms(RETRY_POLICY.max_attempts, RETRY_POLICY.base_seconds, RETRY_POLICY.max_seconds)


@pytest.fixture(scope="session")
def retry_policy() -> RetryPolicy:
    """The retry policy whose delay queues the ``rabbit`` fixture declares."""
    return RETRY_POLICY


@pytest.fixture(scope="module")
async def pg_engine(database_url: str, request: pytest.FixtureRequest) -> AsyncIterator[AsyncEngine]:
    """A database of the module's own on the harness's server, with every migration applied."""
    module = request.module.__name__.rsplit(".", 1)[-1]
    async with scratch_database(database_url, f"it_{module}") as url:
        engine = create_engine(url)
        try:
            await upgrade(engine)
            yield engine
        finally:
            await engine.dispose()


@pytest.fixture(scope="module")
async def engine(pg_engine: AsyncEngine) -> AsyncEngine:
    """The module's database with the test participant's ``effects`` table."""
    async with pg_engine.begin() as connection:
        await connection.run_sync(effects_metadata.create_all)
    return pg_engine


async def purge_stock_queues(transport: RabbitTransport) -> None:
    """Empty the delay queues first (they feed the work queue), then work queue and DLQ."""
    channel = await transport.connection.channel()
    try:
        names = [STOCK_COMMANDS.delay_queue(ms) for ms in RETRY_DELAYS_MS]
        names += [STOCK_COMMANDS.name, STOCK_COMMANDS.dlq]
        for name in names:
            queue = await channel.get_queue(name, ensure=True)
            await queue.purge()
    finally:
        await channel.close()


@pytest.fixture
async def rabbit(amqp_url: str) -> AsyncIterator[RabbitTransport]:
    """A connected transport over a declared topology with empty stock queues."""
    transport = RabbitTransport(amqp_url, retry_delays_ms=RETRY_DELAYS_MS)
    await transport.declare_topology()
    await purge_stock_queues(transport)
    try:
        yield transport
    finally:
        await transport.close()


@pytest.fixture
async def amqp_channel(amqp_url: str) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    """A raw publisher-confirm channel on its own connection."""
    connection = await aio_pika.connect(amqp_url)
    try:
        yield await connection.channel(publisher_confirms=True)
    finally:
        await connection.close()


async def queue_depth(channel: aio_pika.abc.AbstractChannel, name: str) -> int:
    """Ready messages in a queue, as the broker counts them."""
    queue = await channel.declare_queue(name, passive=True)
    return queue.declaration_result.message_count


@pytest.fixture
def depth(amqp_channel: aio_pika.abc.AbstractChannel) -> Callable[[str], Awaitable[int]]:
    """``await depth("stock.commands.dlq")``: ready messages in the named queue."""
    return lambda name: queue_depth(amqp_channel, name)


@pytest.fixture
async def consume(
    rabbit: RabbitTransport,
) -> AsyncIterator[Callable[..., Awaitable[RabbitSubscription]]]:
    """``await consume(handler, prefetch=10)`` starts a consumer of ``stock.commands``."""
    subscriptions: list[RabbitSubscription] = []

    async def start(handler: DeliveryHandler, prefetch: int = 10, transport: RabbitTransport | None = None) -> RabbitSubscription:
        subscription = await (transport or rabbit).consume(STOCK_COMMANDS, handler, prefetch)
        subscriptions.append(subscription)
        return subscription

    try:
        yield start
    finally:
        for subscription in subscriptions:
            await subscription.stop(grace_seconds=5)


@pytest.fixture(scope="session")
def span_exporter() -> InMemorySpanExporter:
    """Install the SDK tracer provider once per process, exporting to memory.

    OpenTelemetry lets a process set its global tracer provider only once, so every
    test that looks at spans shares this exporter (see ``spans``).
    """
    exporter = InMemorySpanExporter()
    provider = configure_tracing("compensa-tests", exporter=exporter)
    assert trace.get_tracer_provider() is provider, "another tracer provider was installed first"
    return exporter


@pytest.fixture
def spans(span_exporter: InMemorySpanExporter) -> Iterator[InMemorySpanExporter]:
    """The shared span exporter, emptied before the test."""
    span_exporter.clear()
    yield span_exporter


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
async def migrated(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[AsyncEngine]:
    """A database at head: a new SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("migrated") / "compensa.db"
        engine = create_engine(f"sqlite+aiosqlite:///{path}")
        try:
            await upgrade(engine)
            yield engine
        finally:
            await engine.dispose()
        return
    async with scratch_database(request.getfixturevalue("database_url"), "it_migrated") as url:
        engine = create_engine(url)
        try:
            await upgrade(engine)
            yield engine
        finally:
            await engine.dispose()
