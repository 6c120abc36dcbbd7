"""Hostile messages on the real broker: each is dead-lettered with its reason, none wedges a queue.

Every poison class the red team sent (and hypothesis-generated variants) is published
straight to RabbitMQ, past every edge that would refuse it, into the queues of running
services. Each must end in its DLQ within a deadline — acknowledged exactly once — and
an order placed afterwards, and the good messages around the poison, must complete.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import aio_pika
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumers.stock import seed_stock
from contracts import MAX_MESSAGE_BYTES
from infra import topology as t
from infra.bootstrap import MESSAGE_SERVICES
from infra.clock import SystemClock
from infra.runtime import Runtime
from infra.transport.factory import transport_from_settings
from tests.e2e.support import Stack, place, planned, unique, wait_terminal
from tests.support import eventually

pytestmark = pytest.mark.e2e


def reserve(order_id: str, **envelope: Any) -> dict[str, Any]:
    raw = {
        "message_id": str(uuid.uuid4()),
        "type": "stock.reserve",
        "version": 1,
        "occurred_at": datetime.now(UTC).isoformat(),
        "correlation_id": order_id,
        "producer": "saga",
        "payload": {"order_id": order_id, "lines": [{"sku": "SKU-HOSTILE", "quantity": 1}]},
    }
    raw.update(envelope)
    return raw


def poison_corpus() -> dict[str, tuple[bytes, dict[str, Any]]]:
    """name -> (body, AMQP properties); every one must be refused.

    A body that carries an envelope message id is published under it, so the check
    that is meant to refuse it, not the id check, does.
    """
    surrogate = json.dumps(reserve("o-s")).replace("SKU-HOSTILE", "\\ud800").encode()
    corpus: dict[str, tuple[bytes, dict[str, Any]]] = {
        "nested 10,000 deep": (b'{"a":' * 10_000 + b"1" + b"}" * 10_000, {}),
        "integer of 5,000 digits": (b'{"version": ' + b"9" * 5_000 + b"}", {}),
        "over the size limit": (b'{"pad": "' + b"x" * (MAX_MESSAGE_BYTES + 10) + b'"}', {}),
        "raw NUL byte": (b'{"type": "stock.reserve\x00"}', {}),
        "NUL in the correlation id": (json.dumps(reserve("o-1\u0000")).encode(), {}),
        "lone surrogate": (surrogate, {}),
        "not UTF-8": (b'{"type": "\xff\xfe"}', {}),
        "empty body": (b"", {}),
        "a JSON array": (b"[1, 2, 3]", {}),
        "quantity as a string": (
            json.dumps(reserve("o-q", payload={"order_id": "o-q", "lines": [{"sku": "A", "quantity": "2"}]})).encode(),
            {},
        ),
        "version 2**31": (json.dumps(reserve("o-v", version=2**31)).encode(), {}),
        "another saga's order": (json.dumps(reserve("o-mine", correlation_id="o-theirs")).encode(), {}),
        "markup in the AMQP correlation id": (
            json.dumps(reserve("o-m", version=9)).encode(),
            {"correlation_id": "[bold red]x[/]"},
        ),
        "forged attempt header": (json.dumps(reserve("o-a", version=8)).encode(), {"headers": {t.H_ATTEMPT: 2**40}}),
        "forged x-death": (
            json.dumps(reserve("o-d", version=7)).encode(),
            {"headers": {"x-death": [{"count": 2**40, "queue": "x", "reason": "rejected"}]}},
        ),
    }
    return corpus


@pytest.fixture(scope="module")
async def running(stack: Stack):  # type: ignore[no-untyped-def]
    """Every service, for the whole module (hypothesis runs many examples in one test)."""
    transport = await transport_from_settings(stack.settings())
    runtime = Runtime(stack.engine, transport, SystemClock(), stack.settings(), MESSAGE_SERVICES)
    await runtime.start()
    yield runtime
    await runtime.stop()
    await transport.close()


async def publish_raw(stack: Stack, body: bytes, properties: dict[str, Any], message_id: str) -> None:
    exchange = await stack.channel.get_exchange(t.COMMANDS.name)
    await exchange.publish(
        aio_pika.Message(body, message_id=message_id, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **properties),
        routing_key="stock.reserve",
    )


def _envelope_id(body: bytes) -> str | None:
    try:
        return str(json.loads(body)["message_id"])
    except (ValueError, KeyError, TypeError, RecursionError):
        return None


async def dead_letter_ids(stack: Stack) -> dict[str, str]:
    """message id -> reason class of every dead letter in stock.commands.dlq (taken off it)."""
    dlq = await stack.channel.get_queue(t.STOCK_COMMANDS.dlq, ensure=True)
    found = {}
    while (message := await dlq.get(fail=False)) is not None:
        await message.ack()
        found[message.message_id or ""] = str(message.headers.get(t.H_REASON_CLASS))
    return found


async def test_every_poison_class_is_dead_lettered_and_good_work_around_it_completes(stack: Stack, running: Runtime) -> None:
    sku = unique("SKU")
    await seed_stock(stack.engine, {sku: 100})
    before = planned([(sku, 1, 100)])
    await place(stack.engine, before)
    sent = {}
    for name, (body, properties) in poison_corpus().items():
        message_id = _envelope_id(body) or f"poison-{len(sent)}"
        await publish_raw(stack, body, properties, message_id)
        sent[message_id] = name
    after = [planned([(sku, 1, 100)]) for _ in range(3)]
    for order in after:
        await place(stack.engine, order)

    statuses = await wait_terminal(stack.engine, [before.order_id, *(o.order_id for o in after)], timeout=30)
    assert set(statuses.values()) == {"completed"}
    collected: dict[str, str] = {}

    async def all_dead_lettered() -> bool:
        collected.update(await dead_letter_ids(stack))
        missing = sorted(name for mid, name in sent.items() if mid not in collected)
        assert not missing, f"not dead-lettered yet: {missing}"
        return True

    await eventually(all_dead_lettered, timeout=20, interval=0.1, message="every poison message in the DLQ")
    assert {collected[mid] for mid in sent} == {"contract"}, {sent[mid]: collected[mid] for mid in sent}
    assert await stack.queue_depth(t.STOCK_COMMANDS.name) == 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=25,
)
mutations = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.tuples(
        st.sampled_from(["message_id", "type", "version", "occurred_at", "correlation_id", "producer", "payload"]), json_values
    ).map(lambda field: json.dumps(reserve("o-gen", **{field[0]: field[1]})).encode()),
)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bodies=st.lists(mutations, min_size=10, max_size=10))
async def test_generated_hostile_bodies_all_end_in_the_dlq(stack: Stack, running: Runtime, bodies: list[bytes]) -> None:
    sent = []
    for body in bodies:
        message_id = f"gen-{uuid.uuid4()}"
        await publish_raw(stack, body, {}, message_id)
        sent.append(message_id)
    collected: dict[str, str] = {}

    async def all_dead_lettered() -> bool:
        collected.update(await dead_letter_ids(stack))
        assert all(mid in collected for mid in sent), f"{sum(m in collected for m in sent)} of {len(sent)}"
        return True

    await eventually(all_dead_lettered, timeout=20, interval=0.1, message="every generated body in the DLQ")
    assert {collected[mid] for mid in sent} == {"contract"}


async def test_the_broker_refuses_a_body_past_its_limit_and_the_publisher_hears_it(stack: Stack) -> None:
    """A consumer holds its whole prefetch in memory: 20 MB bodies must not reach it."""
    connection = await aio_pika.connect(stack.amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(t.COMMANDS.name)
        with pytest.raises(aio_pika.exceptions.AMQPError, match="max size"):
            await exchange.publish(aio_pika.Message(b"x" * (3 * 1024 * 1024), message_id="huge"), routing_key="stock.reserve")
            await channel.close()
    finally:
        await connection.close()
