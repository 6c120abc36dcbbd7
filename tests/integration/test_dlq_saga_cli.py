"""Saga inspection, dead-letter context and health through the CLI, on the real servers.

`saga show` of a compensated saga lists its transitions in order; `saga list` finds
old and stuck sagas; `saga retry` resends a compensation_failed saga's compensations;
`dlq show` tells where the dead letter's saga stands; `health` and `GET /health`
report the relay lagging, then healthy once it caught up.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import aio_pika
import httpx
import pytest
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts import Money, OrderCreated, OrderLine, PaymentDeclined, ReserveStock, StockLine, StockReleased, StockReserved, new_message
from contracts.clock import Clock
from contracts.messages import Payload
from infra import topology as t
from infra.clock import SystemClock, VirtualClock
from infra.dlq.archive import start_archive
from infra.dlq.tables import dead_letters
from infra.health import check_health, health_app
from infra.services import orchestrator_for, sweep_deadlines
from infra.settings import Settings
from infra.transport.rabbit import RabbitTransport
from outbox.relay import Relay
from outbox.tables import tables_for
from outbox.uow import UnitOfWork
from sagas.tables import saga_deadlines, saga_history, saga_instances
from tests.integration.dlq_support import COMPENSA, archived, assert_one_line_error, compensa, publish_dead_letter, purge, stack_env
from tests.support import eventually

pytestmark = pytest.mark.integration

ORCHESTRATOR = orchestrator_for(Settings())
NOW = SystemClock().now()


async def drive(engine: AsyncEngine, clock: Clock, saga_id: str, payloads: Sequence[Payload]) -> None:
    """Deliver saga events to the orchestrator, one transaction each, as the saga service does."""
    for payload in payloads:
        message = new_message(payload, correlation_id=saga_id, producer="test", occurred_at=clock.now())
        async with UnitOfWork(engine, "saga", clock, incoming=message) as uow:
            await ORCHESTRATOR.handle(uow, message)
            await uow.commit()
        if isinstance(clock, VirtualClock):
            clock.advance(1)


def order(saga_id: str) -> OrderCreated:
    return OrderCreated(order_id=saga_id, customer_id="c-1", lines=(OrderLine(sku="sku-1", quantity=2, unit_price=150),),
                        total=Money(amount=300, currency="EUR"), payment_token="tok_decline_1")


def until_declined(saga_id: str) -> list[Payload]:
    return [order(saga_id), StockReserved(order_id=saga_id, lines=(StockLine(sku="sku-1", quantity=2),)),
            PaymentDeclined(order_id=saga_id, reason="card declined")]


@pytest.fixture(scope="module")
async def sagas(pg_engine: AsyncEngine) -> dict[str, str]:
    """comp-1 compensated (cancelled) now; failed-1 compensation_failed 30 days ago; stuck-1 running since 2 h."""
    engine = pg_engine
    await drive(engine, SystemClock(), "comp-1", [*until_declined("comp-1"), StockReleased(order_id="comp-1")])
    old = VirtualClock(NOW - timedelta(days=30))
    await drive(engine, old, "failed-1", until_declined("failed-1"))
    for _ in range(20):  # the release is never confirmed: resend until the budget runs out
        old.advance(31)
        await sweep_deadlines(engine, old, orchestrator=ORCHESTRATOR)
    await drive(engine, VirtualClock(NOW - timedelta(hours=2)), "stuck-1", [order("stuck-1")])
    async with engine.connect() as connection:
        statuses = dict((await connection.execute(select(saga_instances.c.saga_id, saga_instances.c.status))).all())
    assert statuses == {"comp-1": "cancelled", "failed-1": "compensation_failed", "stuck-1": "running"}
    return statuses


@pytest.fixture
def env(pg_engine: AsyncEngine, amqp_url: str) -> dict[str, str]:
    return stack_env(pg_engine, amqp_url)


async def test_saga_show_of_a_compensated_saga_lists_its_transitions_in_order(sagas: dict[str, str], env: dict[str, str]) -> None:
    shown = await compensa(env, "saga", "show", "comp-1", "--json")
    assert shown.returncode == 0, shown.stderr
    document = shown.json()
    history = document["history"]

    assert document["saga"]["status"] == "cancelled"
    assert [e["version"] for e in history] == [1, 2, 3, 4]
    assert [e["trigger"] for e in history] == ["order.created", "stock.reserved", "payment.declined", "stock.released"]
    assert [(e["from_status"], e["to_status"]) for e in history] == [
        (None, "running"), ("running", "running"), ("running", "compensating"), ("compensating", "cancelled"),
    ]
    assert [[s["type"] for s in e["sent"]] for e in history] == [["stock.reserve"], ["payment.charge"], ["stock.release"], ["order.cancelled"]]
    assert all(e["message_id"] for e in history) and [e["at"] for e in history] == sorted(e["at"] for e in history)

    shown = await compensa(env, "saga", "show", "comp-1")
    heading, table = shown.stdout.split("\n", 1)
    assert heading.startswith("saga comp-1: cancelled")
    positions = [table.index(trigger) for trigger in ("order.created", "stock.reserved", "payment.declined", "stock.released")]
    assert positions == sorted(positions)
    mermaid = (await compensa(env, "saga", "show", "comp-1", "--mermaid")).stdout.splitlines()
    assert mermaid[0] == "sequenceDiagram"
    assert [line for line in mermaid if "->>Saga" in line][-1].strip().startswith("Stock->>Saga: stock.released")


async def test_saga_list_finds_old_and_stuck_sagas(sagas: dict[str, str], env: dict[str, str]) -> None:
    async def listed(*args: str) -> list[str]:
        run = await compensa(env, "saga", "list", *args, "--json")
        assert run.returncode == 0, run.stderr
        return sorted(r["saga_id"] for r in run.json())

    assert await listed() == ["comp-1", "failed-1", "stuck-1"]
    assert await listed("--older-than", "1h") == ["failed-1", "stuck-1"]
    assert await listed("--older-than", "1d") == ["failed-1"]
    assert await listed("--stuck-for", "1h") == ["stuck-1"]  # failed-1 is old but terminal
    assert await listed("--stuck-for", "3h") == []
    assert await listed("--status", "compensation_failed") == ["failed-1"]
    assert_one_line_error(await compensa(env, "saga", "list", "--stuck-for", "forever"), "--stuck-for: bad duration")


async def test_saga_retry_resends_the_compensations_of_a_compensation_failed_saga(
    sagas: dict[str, str], pg_engine: AsyncEngine, env: dict[str, str],
) -> None:
    assert_one_line_error(await compensa(env, "saga", "retry", "comp-1"), "saga comp-1 is cancelled, not compensation_failed")
    assert_one_line_error(await compensa(env, "saga", "retry", "nobody"), "no saga 'nobody'")
    outbox = tables_for("saga").outbox
    async with pg_engine.connect() as connection:
        before = (await connection.execute(select(outbox.c.id).where(outbox.c.correlation_id == "failed-1"))).scalars().all()

    run = await compensa(env, "saga", "retry", "failed-1", "--json")
    assert run.returncode == 0, run.stderr
    assert run.json() | {"note": None} == {
        "saga_id": "failed-1", "status": "compensating", "trigger": "operator:retry_compensation", "note": None, "sent": ["stock.release"],
    }
    async with pg_engine.connect() as connection:
        sent = (await connection.execute(select(outbox.c.type).where(outbox.c.correlation_id == "failed-1", outbox.c.id.not_in(before)))).scalars().all()
        status = (await connection.execute(select(saga_instances.c.status).where(saga_instances.c.saga_id == "failed-1"))).scalar_one()
        last = (await connection.execute(select(saga_history.c.trigger).where(saga_history.c.saga_id == "failed-1").order_by(saga_history.c.version.desc()).limit(1))).scalar_one()
        deadline = (await connection.execute(select(saga_deadlines.c.kind).where(saga_deadlines.c.saga_id == "failed-1"))).scalar_one()
    assert (sent, status, last, deadline) == (["stock.release"], "compensating", "operator:retry_compensation", "compensation")


async def test_dlq_show_and_list_tell_where_the_saga_of_a_dead_letter_stands(
    sagas: dict[str, str], pg_engine: AsyncEngine, rabbit: RabbitTransport, amqp_channel: aio_pika.abc.AbstractChannel,
    amqp_url: str, env: dict[str, str],
) -> None:
    async with pg_engine.begin() as connection:
        await connection.execute(delete(dead_letters))
    await purge(rabbit.connection, *(q.dlq for q in t.WORK_QUEUES))
    release = new_message(ReserveStock(order_id="comp-1", lines=(StockLine(sku="sku-1", quantity=2),)), correlation_id="comp-1", producer="saga")
    earlier = NOW - timedelta(hours=3)
    await publish_dead_letter(amqp_channel, t.STOCK_COMMANDS, release, reason="RuntimeError: disk full", failed_at=earlier)
    other = new_message(ReserveStock(order_id="zzz", lines=(StockLine(sku="sku-2", quantity=1),)), correlation_id="zzz", producer="saga")
    await publish_dead_letter(amqp_channel, t.STOCK_COMMANDS, other, reason_class="contract", reason="bad")
    await publish_dead_letter(amqp_channel, t.PAYMENTS_COMMANDS, other, reason_class="contract", reason="bad")
    transport = RabbitTransport(amqp_url)
    await transport.connect()
    handler, subscriptions = await start_archive(transport, pg_engine, SystemClock(), prefetch=10)
    try:
        await eventually(lambda: handler.archived == 3, timeout=10)
    finally:
        for subscription in subscriptions:
            await subscription.stop(5)
        await transport.close()
    [row] = [r for r in await archived(pg_engine) if r.saga_id == "comp-1"]

    shown = await compensa(env, "dlq", "show", str(row.id), "--json")
    assert shown.returncode == 0, shown.stderr
    document = shown.json()
    letter, saga = document["dead_letter"], document["saga"]
    assert (letter["queue"], letter["type"], letter["reason"], letter["message_id"]) == ("stock.commands", "stock.reserve", "RuntimeError: disk full", str(release.message_id))
    assert letter["body"]["payload"] == {"order_id": "comp-1", "lines": [{"sku": "sku-1", "quantity": 2}]}
    assert letter["headers"][t.H_ORIGINAL_QUEUE] == "stock.commands"
    assert saga["status"] == "cancelled"
    assert [e["trigger"] for e in saga["last_transitions"]] == ["order.created", "stock.reserved", "payment.declined", "stock.released"]
    text = await compensa(env, "dlq", "show", str(row.id))
    assert "RuntimeError: disk full" in text.stdout and "saga comp-1: cancelled" in text.stdout and '"quantity": 2' in text.stdout

    async def ids(*args: str) -> list[str]:
        run = await compensa(env, "dlq", "list", *args, "--json")
        assert run.returncode == 0, run.stderr
        return sorted(d["saga_id"] + "@" + d["queue"] for d in run.json()["dead_letters"])

    assert await ids("--saga", "comp-1") == ["comp-1@stock.commands"]
    assert await ids("--until", (NOW - timedelta(hours=1)).isoformat()) == ["comp-1@stock.commands"]
    assert await ids("--since", "1h") == ["zzz@payments.commands", "zzz@stock.commands"]
    assert await ids("--queue", "stock.commands", "--reason-class", "contract") == ["zzz@stock.commands"]
    groups = (await compensa(env, "dlq", "list", "--group", "--json")).json()
    assert sorted((g["queue"], g["reason_class"], g["count"]) for g in groups) == [
        ("payments.commands", "contract", 1), ("stock.commands", "contract", 1), ("stock.commands", "handler_error", 1),
    ]
    assert_one_line_error(await compensa(env, "dlq", "show", "999999"), "no dead letter 999999")


async def test_health_reports_a_lagging_relay_then_healthy_and_so_does_get_health(
    sagas: dict[str, str], pg_engine: AsyncEngine, rabbit: RabbitTransport, amqp_url: str, env: dict[str, str],
) -> None:
    settings = Settings(database_url=env["COMPENSA_DATABASE_URL"], amqp_url=amqp_url)
    lagging = await compensa(env, "health", "--json")  # the sagas' commands were never relayed; some are 30 days old
    assert lagging.returncode == 1
    report = lagging.json()
    assert report["checks"]["database"]["ok"] and report["checks"]["broker"]["ok"]
    assert not report["checks"]["relay"]["ok"] and "compensa relay" in report["checks"]["relay"]["fix"]
    assert report["checks"]["relay"]["outboxes"]["saga"]["pending"] > 0
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=health_app(settings)), base_url="http://test") as client:
        response = await client.get("/health")
    assert response.status_code == 503 and response.json()["status"] == "unhealthy"

    relay = Relay(pg_engine, "saga", rabbit, SystemClock())
    await relay.drain()
    await purge(rabbit.connection, t.STOCK_COMMANDS.name, t.PAYMENTS_COMMANDS.name, t.ORDERS_EVENTS.name)
    healthy = await compensa(env, "health")
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert "healthy" in healthy.stdout and "unhealthy" not in healthy.stdout
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=health_app(settings)), base_url="http://test") as client:
        response = await client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["ok"] and set(body["checks"]) == {"database", "relay", "broker", "redis", "dead_letters"}
    assert set(body["checks"]["dead_letters"]["queues"]) == {q.name for q in t.WORK_QUEUES}

    broken = await check_health(Settings(database_url=env["COMPENSA_DATABASE_URL"], amqp_url="amqp://guest:guest@127.0.0.1:1/"))
    assert not broken["ok"] and broken["checks"]["database"]["ok"]
    assert "COMPENSA_AMQP_URL" in broken["checks"]["broker"]["fix"]


async def test_health_serve_answers_get_health_over_http(sagas: dict[str, str], env: dict[str, str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = await asyncio.create_subprocess_exec(
        COMPENSA, "health", "--serve", "--host", "127.0.0.1", "--port", str(port), env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    try:
        async def answered() -> Any:
            try:
                async with httpx.AsyncClient() as client:
                    return await client.get(f"http://127.0.0.1:{port}/health", timeout=10)
            except httpx.TransportError:
                return None

        response = await eventually(answered, timeout=20, interval=0.2, message="health server answering")
        assert response.status_code in (200, 503)
        assert response.json()["checks"]["database"]["ok"]
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 15)
