"""Fixtures for the ingest modules (HTTP API, CLI, delivery, SDK, Schemathesis).

- ``engine``: the module's database (conftest's ``pg_engine``) with an empty ingest outbox
  and no producers; it overrides the parent's ``engine``, which adds the ``effects`` table.
- ``redis``: a client on the harness's Redis.
- ``add_producer``: ``key = await add_producer("erp", ["order.created"], rate_limit=None)``.
- ``make_app`` / ``make_client``: the ingest app in-process, and httpx clients on it.
- ``rabbit_publisher``, ``ledger_queue``: what the relay publishes with, and a queue to read.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aio_pika
import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncEngine

from producers.ingest import IngestConfig, ProducerDirectory, ProducerStore, create_app, generate_key
from producers.ingest.tables import ingest_producers
from tests.integration.support import OUTBOX, clock


@pytest.fixture
async def engine(pg_engine: AsyncEngine) -> AsyncEngine:
    """The module's database with an empty ingest outbox and no producers."""
    async with pg_engine.begin() as connection:
        await connection.execute(delete(OUTBOX))
        await connection.execute(delete(ingest_producers))
    return pg_engine


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def add_producer(engine: AsyncEngine) -> Callable[..., Awaitable[str]]:
    """``key = await add_producer("erp", ["order.created"], rate_limit=None)`` stores a key; returns it."""

    async def add(name: str = "erp", types: tuple[str, ...] = ("order.created",), rate_limit: int | None = None) -> str:
        key, record = generate_key(name, types, rate_limit=rate_limit, now=clock.now())
        await ProducerStore(engine).add(record)
        return key

    return add


@pytest.fixture
def make_app(engine: AsyncEngine, redis: Redis) -> Callable[..., Any]:
    """``make_app(**config)``: the ingest app on the module's database, in a fresh Redis namespace."""
    prefix = f"test:{uuid.uuid4().hex[:8]}:"

    def make(**config: Any) -> Any:
        settings = IngestConfig(**{"redis_prefix": prefix, "key_cache_seconds": 0.0, **config})
        directory = ProducerDirectory(ProducerStore(engine), cache_seconds=settings.key_cache_seconds)
        return create_app(engine=engine, redis=redis, producers=directory, config=settings, clock=clock)

    return make


@pytest.fixture
async def make_client(make_app: Callable[..., Any]) -> AsyncIterator[Callable[..., httpx.AsyncClient]]:
    """``make_client(key, **config)``: an httpx client on the app in-process (ASGI)."""
    clients: list[httpx.AsyncClient] = []

    def make(key: str | None = None, **config: Any) -> httpx.AsyncClient:
        headers = {"X-API-Key": key} if key else {}
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=make_app(**config)), base_url="http://ingest", headers=headers
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


@pytest.fixture
async def rabbit_publisher(amqp_url: str) -> AsyncIterator[Any]:
    """A RabbitTransport over the declared topology: what the relay publishes with."""
    from infra.transport.rabbit import RabbitTransport

    transport = RabbitTransport(amqp_url)
    await transport.connect()
    await transport.declare_topology()
    try:
        yield transport
    finally:
        await transport.close()


@pytest.fixture
async def ledger_queue(amqp_url: str, rabbit_publisher: Any) -> AsyncIterator[Callable[[], Awaitable[list[Any]]]]:
    """A private queue bound to ``ledger.updated``; ``await received()`` drains it so far."""
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    queue = await channel.declare_queue(f"test.ingest.{uuid.uuid4().hex[:8]}", exclusive=True)
    await queue.bind("compensa.events", routing_key="ledger.updated")
    got: list[Any] = []

    async def received() -> list[Any]:
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            got.append(message)
        return got

    try:
        yield received
    finally:
        await connection.close()
