"""Helpers for the integration tests on the real servers.

- The test participant: its ``effects`` table (one row per applied reservation, in
  order; conftest's ``engine`` creates it) and its handler, ``record_reservation``.
- Ingest: ``clock``, outbox reads, ``relay_for`` (the ingest modules' fixtures are in
  ``ingest/conftest.py``).
- Dead letters: ``stack_env`` (the environment pointing the CLI at the test database
  and broker), ``publish_dead_letter`` (into `<queue>.dlq` exactly as the consumer
  pipeline dead-letters, headers included), ``purge``, ``archived``.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

import aio_pika
from sqlalchemy import Column, Integer, MetaData, Row, String, Table, func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts import Message, ReserveStock, encode
from infra import topology as t
from infra.clock import SystemClock
from infra.dlq.tables import dead_letters
from outbox.tables import tables_for
from outbox.uow import UnitOfWork

clock = SystemClock()


# ------------------------------------------------------------------ the test participant

effects_metadata = MetaData()
#: The test participant's only business table: one row per applied reservation, in order.
effects = Table(
    "test_effects",
    effects_metadata,
    Column("position", Integer, primary_key=True, autoincrement=True),
    Column("message_id", String(36), nullable=False),
    Column("order_id", String(64), nullable=False),
    Column("quantity", Integer, nullable=False),
)


async def record_reservation(uow: UnitOfWork, message: Message[ReserveStock]) -> None:
    """The test participant's handler: record, in the unit of work, that the reservation took effect."""
    await uow.connection.execute(
        insert(effects).values(
            message_id=str(message.message_id),
            order_id=message.payload.order_id,
            quantity=sum(line.quantity for line in message.payload.lines),
        )
    )


async def applied_rows(engine: AsyncEngine) -> list[Row[Any]]:
    """The effects rows, in the order they were applied."""
    async with engine.connect() as connection:
        return list((await connection.execute(select(effects).order_by(effects.c.position))).all())


# ------------------------------------------------------------------ ingest

OUTBOX = tables_for("ingest").outbox


async def outbox_rows(engine: AsyncEngine) -> list[Any]:
    async with engine.connect() as connection:
        return list((await connection.execute(select(OUTBOX).order_by(OUTBOX.c.id))).all())


async def outbox_count(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        return int((await connection.execute(select(func.count()).select_from(OUTBOX))).scalar_one())


def relay_for(engine: AsyncEngine, publisher: Any) -> Any:
    from outbox.relay import Relay

    return Relay(engine, "ingest", publisher, clock, batch_size=50)


# ------------------------------------------------------------------ dead letters


def stack_env(engine: AsyncEngine, amqp_url: str | None = None, **extra: str) -> dict[str, str]:
    """The process environment minus every COMPENSA_* variable, plus the test stack's URLs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPENSA_")}
    env["COMPENSA_DATABASE_URL"] = engine.url.render_as_string(hide_password=False)
    if amqp_url:
        env["COMPENSA_AMQP_URL"] = amqp_url
    env["COMPENSA_LOG_LEVEL"] = "WARNING"
    env["COLUMNS"] = "200"
    env.update(extra)
    return env


def dead_letter_headers(
    queue: t.QueueSpec,
    message_type: str,
    *,
    reason_class: str = "handler_error",
    reason: str = "RuntimeError: boom",
    saga_id: str | None = None,
    attempts: int = 1,
    failed_at: datetime | None = None,
) -> dict[str, Any]:
    stamp = (failed_at or datetime.now(UTC)).isoformat()
    headers: dict[str, Any] = {
        t.H_REASON_CLASS: reason_class,
        t.H_REASON: reason,
        t.H_ATTEMPT: attempts,
        t.H_ORIGINAL_EXCHANGE: queue.exchange.name,
        t.H_ORIGINAL_ROUTING_KEY: message_type,
        t.H_ORIGINAL_QUEUE: queue.name,
        t.H_FIRST_FAILURE: stamp,
        t.H_LAST_FAILURE: stamp,
    }
    if saga_id:
        headers[t.H_SAGA_ID] = saga_id
    return headers


async def publish_dead_letter(
    channel: aio_pika.abc.AbstractChannel, queue: t.QueueSpec, message: Message[Any], **header_args: Any
) -> None:
    """Publish `message` into `queue`'s DLQ as the pipeline would have, confirmed."""
    headers = dead_letter_headers(queue, message.type, saga_id=message.correlation_id, **header_args)
    await channel.default_exchange.publish(
        aio_pika.Message(
            encode(message.envelope),
            headers=headers,
            message_id=str(message.message_id),
            correlation_id=message.correlation_id,
            type=message.type,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        ),
        routing_key=queue.dlq,
    )


async def purge(connection: aio_pika.abc.AbstractConnection, *names: str) -> None:
    channel = await connection.channel()
    try:
        for name in names:
            queue = await channel.get_queue(name, ensure=True)
            await queue.purge()
    finally:
        await channel.close()


async def archived(engine: AsyncEngine, *where: Any) -> list[Any]:
    async with engine.connect() as connection:
        return list((await connection.execute(select(dead_letters).where(*where).order_by(dead_letters.c.id))).all())
