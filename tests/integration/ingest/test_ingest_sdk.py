"""The producer SDK on real PostgreSQL, Redis and RabbitMQ.

In process, `publish` writes into the caller's own transaction: their rollback drops
the event, their commit hands it to the relay. Over HTTP, a send whose response is
lost is retried under the same idempotency key and makes one event.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from contracts import ContractError, LedgerUpdated, Posting, decode
from producers.sdk import (
    AsyncIngestClient,
    AuthenticationFailed,
    IdempotencyKeyReused,
    IngestUnavailable,
    InvalidEvent,
    PermissionDenied,
    publish,
)
from tests.integration.support import (
    outbox_count,
    outbox_rows,
    relay_for,
)
from tests.support import eventually, ledger_updated

pytestmark = pytest.mark.integration

business = MetaData()
#: The caller's own business table, written in the same transaction as the event.
invoices = Table("test_invoices", business, Column("id", Integer, primary_key=True), Column("order_id", String(64)))


@pytest.fixture
async def app_engine(engine: AsyncEngine) -> AsyncEngine:
    async with engine.begin() as connection:
        await connection.run_sync(business.create_all)
        await connection.execute(invoices.delete())
    return engine


def ledger_event(order_id: str) -> LedgerUpdated:
    return LedgerUpdated(
        order_id=order_id,
        transaction_id=f"capture:{order_id}",
        postings=(Posting(account="cash:EUR", debit=100, credit=0), Posting(account="sales:EUR", debit=0, credit=100)),
        balances={"cash:EUR": 100},
    )


async def count_invoices(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        return len((await connection.execute(select(invoices))).all())


async def test_in_transaction_publish_rolled_back_publishes_nothing(app_engine, rabbit_publisher, ledger_queue):
    async with app_engine.connect() as connection, connection.begin() as transaction:
        await connection.execute(insert(invoices).values(order_id="o-1"))
        message = await publish(connection, ledger_event("o-1"), correlation_id="o-1", producer="billing")
        assert message.envelope.producer == "billing"
        await transaction.rollback()
    assert await count_invoices(app_engine) == 0 and await outbox_count(app_engine) == 0
    assert await relay_for(app_engine, rabbit_publisher).drain() == 0
    assert await ledger_queue() == []


async def test_in_transaction_publish_committed_with_a_session_is_delivered(app_engine, rabbit_publisher, ledger_queue):
    sessions = async_sessionmaker(app_engine, class_=AsyncSession)
    async with sessions() as session, session.begin():
        await session.execute(insert(invoices).values(order_id="o-2"))
        message = await publish(
            session, ledger_updated("o-2")["payload"], type="ledger.updated", correlation_id="o-2", producer="billing"
        )
    assert await count_invoices(app_engine) == 1
    assert await relay_for(app_engine, rabbit_publisher).drain() == 1
    [delivered] = await eventually(ledger_queue, message="committed event delivered")
    assert decode(delivered.body).message_id == message.message_id
    # An invalid payload never reaches the outbox.
    async with app_engine.begin() as connection:
        with pytest.raises(ContractError, match="balances"):
            await publish(connection, {"order_id": "o-3"}, type="ledger.updated", correlation_id="o-3", producer="billing")


class LoseFirstResponse(httpx.AsyncBaseTransport):
    """Forward every request to the app, but lose the first response on the way back."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.requests = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        response = await self.inner.handle_async_request(request)
        if self.requests == 1:
            await response.aread()
            raise httpx.ReadError("connection reset before the response arrived", request=request)
        return response


async def no_sleep(_seconds: float) -> None:
    return None


@pytest.fixture
async def sdk_client(make_app, add_producer) -> AsyncIterator[tuple[AsyncIngestClient, LoseFirstResponse]]:
    key = await add_producer("erp", ("ledger.updated",))
    lossy = LoseFirstResponse(httpx.ASGITransport(app=make_app()))
    async with AsyncIngestClient("http://ingest", key, transport=lossy, sleep=no_sleep) as client:
        yield client, lossy


async def test_http_client_retry_after_a_lost_response_makes_one_event(sdk_client, engine):
    client, transport = sdk_client
    accepted = await client.publish(ledger_event("o-1"), correlation_id="o-1")
    assert transport.requests == 2 and accepted.attempts == 2 and accepted.replayed
    [row] = await outbox_rows(engine)
    assert row.message_id == str(accepted.message_id)
    batch = await client.publish_batch([ledger_updated("o-2"), ledger_updated("o-3")], idempotency_key="batch-7")
    again = await client.publish_batch([ledger_updated("o-2"), ledger_updated("o-3")], idempotency_key="batch-7")
    assert batch.message_ids == again.message_ids and again.replayed and await outbox_count(engine) == 3


async def test_http_client_raises_clear_errors_for_4xx(sdk_client, make_app):
    client, _transport = sdk_client
    await client.publish(ledger_event("o-0"), correlation_id="o-0")  # the one whose response is lost
    with pytest.raises(InvalidEvent) as invalid:
        await client.publish({"order_id": "o-1"}, type="ledger.updated", correlation_id="o-1")
    assert any(e["loc"][:3] == ["body", "payload", "transaction_id"] for e in invalid.value.errors)
    assert "body.payload.transaction_id" in str(invalid.value)
    with pytest.raises(PermissionDenied, match=r"order.created"):
        await client.publish({"order_id": "o-1"}, type="order.created", correlation_id="o-1")
    await client.publish(ledger_event("o-1"), correlation_id="o-1", idempotency_key="k-once")
    with pytest.raises(IdempotencyKeyReused):
        await client.publish(ledger_event("o-2"), correlation_id="o-2", idempotency_key="k-once")
    async with AsyncIngestClient("http://ingest", "cpk_0_bad", transport=httpx.ASGITransport(app=make_app())) as stranger:
        with pytest.raises(AuthenticationFailed):
            await stranger.publish(ledger_event("o-1"), correlation_id="o-1")


async def test_http_client_gives_up_while_redis_is_down_and_nothing_is_accepted(make_app, add_producer, engine, redis_server):
    key = await add_producer("erp", ("ledger.updated",))
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async with AsyncIngestClient(
        "http://ingest", key, transport=httpx.ASGITransport(app=make_app()), max_attempts=3, sleep=sleep
    ) as client:
        redis_server.stop()
        try:
            with pytest.raises(IngestUnavailable, match="HTTP 503") as unavailable:
                await client.publish(ledger_event("o-1"), correlation_id="o-1", idempotency_key=f"k-{uuid.uuid4().hex}")
        finally:
            redis_server.start()
    assert "may be retried later" in str(unavailable.value)
    assert slept == [5.0, 5.0]  # the server's Retry-After, within the client's backoff cap
    assert await outbox_count(engine) == 0
