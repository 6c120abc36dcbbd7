"""Fixtures and helpers shared by the ingest tests (imported by name into each module)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from hypothesis import strategies as st
from redis.asyncio import Redis
from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts import Money, OrderCreated, OrderLine
from infra.clock import SystemClock
from outbox.tables import tables_for
from producers.ingest import IngestConfig, ProducerDirectory, ProducerStore, create_app, generate_key
from producers.ingest.tables import ingest_producers

OUTBOX = tables_for("ingest").outbox
clock = SystemClock()


def order_created(order_id: str = "o-1", amount: int = 3000, **overrides: Any) -> dict[str, Any]:
    """The JSON payload of a valid order.created."""
    payload = OrderCreated(
        order_id=order_id, customer_id="c-1", lines=(OrderLine(sku="SKU-1", quantity=2, unit_price=amount // 2),),
        total=Money(amount=amount, currency="EUR"), payment_token="tok_ok_1",
    ).model_dump(mode="json")
    payload.update(overrides)
    return payload


def short_event(order_id: str = "o-1", **overrides: Any) -> dict[str, Any]:
    return {"type": "order.created", "correlation_id": order_id, "payload": order_created(order_id), **overrides}


async def outbox_rows(engine: AsyncEngine) -> list[Any]:
    async with engine.connect() as connection:
        return list((await connection.execute(select(OUTBOX).order_by(OUTBOX.c.id))).all())


async def outbox_count(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        return int((await connection.execute(select(func.count()).select_from(OUTBOX))).scalar_one())


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
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app(**config)), base_url="http://ingest", headers=headers)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


def ledger_updated(order_id: str = "o-1") -> dict[str, Any]:
    """A valid ledger.updated event in the short form. No work queue binds this type, so
    what these tests publish reaches only the test's own queue."""
    return {
        "type": "ledger.updated",
        "correlation_id": order_id,
        "payload": {
            "order_id": order_id,
            "transaction_id": f"capture:{order_id}",
            "postings": [
                {"account": "cash:EUR", "debit": 100, "credit": 0},
                {"account": "sales:EUR", "debit": 0, "credit": 100},
            ],
            "balances": {"cash:EUR": 100},
        },
    }


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
    import aio_pika

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


def relay_for(engine: AsyncEngine, publisher: Any) -> Any:
    from outbox.relay import Relay

    return Relay(engine, "ingest", publisher, clock, batch_size=50)


# ---------------------------------------------------------------- hostile JSON (hypothesis)


class RawJson(str):
    """JSON text written as is: numbers json.dumps cannot write, nesting built by hand."""


def dump(value: Any) -> str:
    """JSON text of `value`, with RawJson pieces as they are."""
    if isinstance(value, RawJson):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {dump(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(dump(v) for v in value) + "]"
    return json.dumps(value)  # ASCII: lone surrogates and NUL travel as \u escapes


WEIRD_CHARS = st.one_of(
    st.characters(),
    st.sampled_from(["\x00", "\x1b", "\x7f", "\n", "\ud800", "\udbff", "\udc00", "\udfff", "\u2028", "\ufeff", "\U0001f600", '"', "\\"]),
)
WEIRD_TEXT = st.text(WEIRD_CHARS, max_size=12)
WEIRD_NUMBERS = st.one_of(
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=2**70),
    st.integers(min_value=-(2**70), max_value=-(2**63) + 2),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=4_290, max_value=6_000).map(lambda n: RawJson("9" * n)),
    st.sampled_from(["1e999", "-1e999", "NaN", "Infinity", "-Infinity", "-0", "1E400", "0.1e-400"]).map(RawJson),
    st.integers(min_value=28, max_value=40).map(lambda n: RawJson("[" * n + "]" * n)),
    st.sampled_from([10_000, 50_000]).map(lambda n: RawJson('{"a":' * n + "0" + "}" * n)),
)
WEIRD_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), WEIRD_NUMBERS, WEIRD_TEXT),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(WEIRD_TEXT, children, max_size=4)),
    max_leaves=16,
)


def _leaf_paths(value: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict):
        return [at, *(p for k, v in value.items() for p in _leaf_paths(v, (*at, k)))]
    if isinstance(value, list):
        return [at, *(p for i, v in enumerate(value) for p in _leaf_paths(v, (*at, i)))]
    return [at]


_VALID = short_event("o-hyp")
_PATHS = [p for p in _leaf_paths(_VALID) if p]


def _replace(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replace(value[path[0]], path[1:], new)
    return copy


#: A valid event with one field (anywhere in it) replaced by something hostile, or any JSON at all.
HOSTILE_EVENTS = st.one_of(
    st.builds(_replace, st.just(_VALID), st.sampled_from(_PATHS), WEIRD_JSON),
    st.builds(lambda key, value: {**_VALID, key: value}, WEIRD_TEXT, WEIRD_JSON),
    WEIRD_JSON,
)
