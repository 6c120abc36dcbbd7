"""One producer cannot undo another's order: one saga per business key, end to end.

Producer A places an order over HTTP and it completes. Producer B, allowed to publish
`order.created`, then tries every way to start a second saga for A's order: over HTTP
under another correlation id (422) or the same one (409), and straight on the broker
under either (dead-lettered: contract, business rule). A's order stays completed, paid
and its stock sold; nothing is refunded or released.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import aio_pika
import httpx
import pytest
from redis.asyncio import Redis

from consumers.ledger import cash_by_order
from consumers.orders import get_order
from consumers.payments import charges
from consumers.stock import reservation_statuses, seed_stock, stock_levels
from infra import topology as t
from infra.clock import SystemClock
from producers.ingest import IngestConfig, ProducerDirectory, create_app
from producers.ingest.auth import ProducerStore, generate_key
from tests.e2e.support import Stack, StartServices, saga_row, saga_triggers, unique, wait_terminal
from tests.support import eventually

pytestmark = pytest.mark.e2e


def order_created(order_id: str, sku: str, *, quantity: int, unit_price: int, customer: str) -> dict:
    return {
        "order_id": order_id,
        "customer_id": customer,
        "lines": [{"sku": sku, "quantity": quantity, "unit_price": unit_price}],
        "total": {"amount": quantity * unit_price, "currency": "EUR"},
        "payment_token": "tok_ok_visa",
    }


async def dead_letters(stack: Stack, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Take every message waiting in a DLQ (acknowledged: the test reads them once)."""
    dlq = await stack.channel.get_queue(queue, ensure=True)
    taken = []
    while (message := await dlq.get(fail=False)) is not None:
        await message.ack()
        taken.append(message)
    return taken


async def test_another_producer_cannot_refund_or_release_a_completed_order(
    stack: Stack, services: StartServices, redis_url: str
) -> None:
    await services()
    sku = unique("SKU")
    await seed_stock(stack.engine, {sku: 10})
    clock = SystemClock()
    store = ProducerStore(stack.engine)
    keys = {}
    for name in ("shop-a", "shop-b"):
        keys[name], record = generate_key(name, ("order.created",), rate_limit=None, now=clock.now())
        await store.add(record)
    redis = Redis.from_url(redis_url)
    app = create_app(
        engine=stack.engine,
        redis=redis,
        producers=ProducerDirectory(store, cache_seconds=0),
        config=IngestConfig(redis_prefix=f"e2e:{uuid.uuid4().hex[:8]}:"),
        clock=clock,
    )
    order_id = unique("order-a")
    victim = order_created(order_id, sku, quantity=3, unit_price=1000, customer="alice")
    attacker = order_created(order_id, sku, quantity=1, unit_price=1, customer="mallory")
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingest") as http:
            placed = await http.post(
                "/v1/events",
                json={"type": "order.created", "correlation_id": order_id, "payload": victim},
                headers={"X-API-Key": keys["shop-a"]},
            )
            assert placed.status_code == 202, placed.text
            assert (await wait_terminal(stack.engine, [order_id]))[order_id] == "completed"

            as_b = {"X-API-Key": keys["shop-b"]}
            other_saga = await http.post(
                "/v1/events",
                json={"type": "order.created", "correlation_id": unique("saga-b"), "payload": attacker},
                headers=as_b,
            )
            assert other_saga.status_code == 422 and other_saga.json()["errors"][0]["loc"] == ["body", "correlation_id"]
            same_saga = await http.post(
                "/v1/events", json={"type": "order.created", "correlation_id": order_id, "payload": attacker}, headers=as_b
            )
            assert same_saga.status_code == 409, same_saga.text
    finally:
        await redis.aclose()

    # Raw AMQP, past the HTTP edge: under another correlation id, then under A's own.
    for correlation_id in (unique("saga-b"), order_id):
        message_id = str(uuid.uuid4())
        envelope = {
            "message_id": message_id,
            "type": "order.created",
            "version": 1,
            "occurred_at": datetime.now(UTC).isoformat(),
            "correlation_id": correlation_id,
            "producer": "shop-b",
            "payload": attacker,
        }
        exchange = await stack.channel.get_exchange(t.EVENTS.name)
        await exchange.publish(
            aio_pika.Message(
                json.dumps(envelope).encode(),
                message_id=message_id,
                correlation_id=correlation_id,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key="order.created",
        )

    async def saga_refused_both() -> list[aio_pika.abc.AbstractIncomingMessage]:
        assert (await stack.queue_depth(t.SAGA_STARTS.dlq)) == 2
        return await dead_letters(stack, t.SAGA_STARTS.dlq)

    refused = await eventually(saga_refused_both, timeout=15, message="both raw starts dead-lettered by the saga")
    reasons = {m.headers[t.H_REASON_CLASS]: str(m.headers[t.H_REASON]) for m in refused}
    assert set(reasons) == {"contract", "business_rule"}
    assert "belongs to the saga of its order_id" in reasons["contract"]
    assert "one saga per business key" in reasons["business_rule"]

    async def orders_refused_both() -> list[aio_pika.abc.AbstractIncomingMessage]:
        assert (await stack.queue_depth(t.ORDERS_EVENTS.dlq)) == 2
        return await dead_letters(stack, t.ORDERS_EVENTS.dlq)

    refused = await eventually(orders_refused_both, timeout=15, message="both raw starts dead-lettered by orders")
    assert {m.headers[t.H_REASON_CLASS] for m in refused} == {"contract", "business_rule"}

    # A's order: completed, paid in full, stock sold; the saga never moved again.
    saga = await saga_row(stack.engine, order_id)
    assert (saga.status, saga.version) == ("completed", 4)
    assert await saga_triggers(stack.engine, order_id) == [
        "order.created",
        "stock.reserved",
        "payment.authorized",
        "stock.committed",
    ]
    charge = (await charges(stack.engine))[order_id]
    assert (charge.status.value, charge.amount.amount, charge.refunded_amount) == ("authorized", 3000, 0)
    assert (await cash_by_order(stack.engine))[order_id] == 3000
    assert (await reservation_statuses(stack.engine))[order_id] == "committed"
    assert (await stock_levels(stack.engine))[sku] == (7, 0)
    order = await get_order(stack.engine, order_id)
    assert order is not None and (order.status.value, order.customer_id, order.total.amount) == ("completed", "alice", 3000)
