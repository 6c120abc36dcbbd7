"""The harness's servers really work: a query, a confirmed publish, a Redis round trip."""

from __future__ import annotations

import uuid

import aio_pika
import pytest
import redis.asyncio as aioredis
from pamqp.commands import Basic
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.harness.servers import Server
from tests.support import eventually

pytestmark = pytest.mark.integration


async def test_postgres_answers_queries(database_url: str) -> None:
    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
            await conn.execute(text("CREATE TEMP TABLE probe (id int PRIMARY KEY)"))
            await conn.execute(text("INSERT INTO probe VALUES (42)"))
            assert (await conn.execute(text("SELECT id FROM probe"))).scalar_one() == 42
    finally:
        await engine.dispose()


async def test_rabbitmq_confirms_and_delivers(amqp_url: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        body = uuid.uuid4().bytes
        confirmation = await channel.default_exchange.publish(
            aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=queue.name,
        )
        assert isinstance(confirmation, Basic.Ack)
        message = await eventually(lambda: queue.get(fail=False), message="published message not in queue")
        assert message.body == body
        await message.ack()


async def test_redis_round_trip(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    try:
        assert await client.ping()
        key = f"probe:{uuid.uuid4()}"
        await client.set(key, "value", ex=60)
        assert await client.get(key) == b"value"
    finally:
        await client.aclose()


async def test_redis_can_be_taken_down_and_brought_back(redis_server: Server) -> None:
    client = aioredis.from_url(redis_server.url, socket_connect_timeout=1)
    try:
        assert await client.ping()
        redis_server.stop()
        with pytest.raises(RedisConnectionError):
            await client.ping()
        redis_server.start()
        assert await eventually(client.ping, message="redis back after restart")
    finally:
        await client.aclose()
