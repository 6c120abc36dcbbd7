"""`compensa health` sees wedged queues, orders without a saga and a stopped sweeper.

On the real servers: RabbitMQ with its management plugin (queue statistics over HTTP)
and PostgreSQL. Each test gets a virtual host of its own with the topology declared,
so what other tests leave in the shared broker cannot make it unhealthy, and what a
test wedges here cannot make another one unhealthy. A queue is wedged when it holds
unacknowledged messages and no ack arrived over the observation window, or ready
messages and no consumer over it; the window is `health_stuck_seconds`, small here.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any
from urllib.parse import quote, urlsplit

import aio_pika
import httpx
import pytest
from sqlalchemy import delete, update
from sqlalchemy.ext.asyncio import AsyncEngine

from consumers.orders.handlers import place_order
from consumers.orders.tables import orders_orders
from contracts import Money, OrderCreated, OrderLine, new_message
from infra import topology as t
from infra.bootstrap import orchestrator_for
from infra.clock import SystemClock, VirtualClock
from infra.health import check_health
from infra.settings import Settings, derive_management_url
from infra.transport.rabbit import RabbitTransport
from outbox.tables import tables_for
from outbox.uow import UnitOfWork
from sagas.tables import saga_history, saga_instances
from tests.harness.servers import Servers, free_port
from tests.integration.support import stack_env
from tests.support import compensa, eventually

pytestmark = pytest.mark.integration

#: The observation window of these tests (the harness's broker samples every second).
WINDOW = 2.0
#: How long a wedge may take to show: the window, the statistics' lag, a margin.
DEADLINE = 30.0
ORCHESTRATOR = orchestrator_for(Settings())


def _split(url: str) -> tuple[str, tuple[str, str]]:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port}", (parts.username or "guest", parts.password or "guest")


@pytest.fixture(scope="module")
def management_url(servers: Servers) -> str:
    return servers.amqp_management_url


@pytest.fixture
async def vhost_url(amqp_url: str, management_url: str) -> AsyncIterator[str]:
    """An AMQP URL on a fresh virtual host with compensa's topology declared; removed after the test."""
    name = f"health-{uuid.uuid4().hex[:10]}"
    base, auth = _split(management_url)
    user = urlsplit(amqp_url).username or "guest"
    async with httpx.AsyncClient(base_url=base, auth=auth, timeout=10) as api:
        created = await api.put(f"/api/vhosts/{quote(name, safe='')}")
        if created.status_code in (401, 403):
            pytest.skip(f"the broker's management user may not create virtual hosts ({created.status_code})")
        created.raise_for_status()
        granted = await api.put(
            f"/api/permissions/{quote(name, safe='')}/{quote(user, safe='')}",
            json={"configure": ".*", "write": ".*", "read": ".*"},
        )
        granted.raise_for_status()
        url = amqp_url.rstrip("/") + "/" + quote(name, safe="")
        transport = RabbitTransport(url)
        try:
            await transport.declare_topology()
        finally:
            await transport.close()
        try:
            yield url
        finally:
            await api.delete(f"/api/vhosts/{quote(name, safe='')}")


@pytest.fixture
async def engine(pg_engine: AsyncEngine) -> AsyncEngine:
    """The module's database, emptied of orders, sagas and outbox rows before each test."""
    async with pg_engine.begin() as connection:
        for table in (
            orders_orders,
            saga_instances,
            saga_history,
            *(tables_for(s).outbox for s in ("orders", "ingest", "saga")),
        ):
            await connection.execute(delete(table))
    return pg_engine


def settings_for(engine: AsyncEngine, amqp_url: str, management_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": engine.url.render_as_string(hide_password=False),
        "amqp_url": amqp_url,
        "amqp_management_url": management_url,
        "redis_url": None,
        "health_stuck_seconds": WINDOW,
    }
    return Settings(**{**values, **overrides})


@pytest.fixture
def settings(engine: AsyncEngine, vhost_url: str, management_url: str) -> Settings:
    return settings_for(engine, vhost_url, management_url)


@pytest.fixture
async def connection(vhost_url: str) -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    """A raw aio-pika connection to the test's virtual host."""
    connection = await aio_pika.connect(vhost_url)
    try:
        yield connection
    finally:
        await connection.close()


async def publish(connection: aio_pika.abc.AbstractConnection, queue: str, count: int) -> None:
    channel = await connection.channel(publisher_confirms=True)
    try:
        for i in range(count):
            await channel.default_exchange.publish(aio_pika.Message(f"m{i}".encode()), routing_key=queue)
    finally:
        await channel.close()


async def report_when(settings: Settings, engine: AsyncEngine, condition: Any, message: str) -> dict[str, Any]:
    """Health reports until `condition(report)` holds (statistics lag behind the broker)."""
    last: dict[str, Any] = {}

    async def check() -> dict[str, Any] | None:
        nonlocal last
        last = await check_health(settings, engine=engine)
        return last if condition(last) else None

    try:
        return await eventually(check, timeout=DEADLINE, interval=0.25, message=message)
    except AssertionError as error:
        raise AssertionError(f"{error}\nlast report: {last}") from None


# ------------------------------------------------------------------ tests


def test_management_url_defaults_to_the_amqp_host_and_credentials() -> None:
    assert derive_management_url("amqp://app:s3cret@rabbit.internal:5672/prod") == "http://app:s3cret@rabbit.internal:15672/"
    assert derive_management_url("amqps://app:pw@rabbit:5671/") == "https://app:pw@rabbit:15671/"
    assert derive_management_url("amqp://rabbit/") == "http://guest:guest@rabbit:15672/"
    assert derive_management_url("amqp://u%40x:p%2Fw@[::1]/") == "http://u%40x:p%2Fw@[::1]:15672/"


async def test_a_healthy_stack_is_healthy(
    settings: Settings, engine: AsyncEngine, connection: aio_pika.abc.AbstractConnection
) -> None:
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=10)
    queue = await channel.get_queue(t.STOCK_COMMANDS.name)
    acked: list[int] = []

    async def ack(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await message.ack()
        acked.append(1)

    await queue.consume(ack)
    await publish(connection, t.STOCK_COMMANDS.name, 20)
    await eventually(lambda: len(acked) == 20, message="20 messages acked")

    report = await report_when(
        settings,
        engine,
        lambda r: r["checks"]["queues"].get("queues", {}).get(t.STOCK_COMMANDS.name, {}).get("consumers") == 1,
        "the management API counting the consumer",
    )
    assert report["status"] == "healthy" and report["ok"], report
    assert {"database", "relay", "broker", "queues", "saga_starts", "deadlines", "redis", "dead_letters"} <= set(report["checks"])
    queues = report["checks"]["queues"]
    assert set(queues["queues"]) == {q.name for q in t.WORK_QUEUES} and set(queues["dlqs"]) == {q.dlq for q in t.WORK_QUEUES}
    assert queues["wedged"] == [] and queues["management_url"].endswith("/") and ":***@" in queues["management_url"]
    assert queues["queues"][t.STOCK_COMMANDS.name] | {"ack_rate": 0, "deliver_rate": 0, "idle_since": None} == {
        "ready": 0,
        "unacked": 0,
        "consumers": 1,
        "ack_rate": 0,
        "deliver_rate": 0,
        "idle_since": None,
        "wedged": False,
    }
    assert report["checks"]["saga_starts"]["pending_orders_without_saga"]["count"] == 0
    assert report["checks"]["deadlines"]["overdue"] == 0


async def test_a_consumer_holding_messages_unacknowledged_is_wedged(
    settings: Settings,
    engine: AsyncEngine,
    connection: aio_pika.abc.AbstractConnection,
) -> None:
    """The incident: 36 messages delivered, never acknowledged, and health said healthy."""
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=100)
    held: list[aio_pika.abc.AbstractIncomingMessage] = []

    async def hold(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        held.append(message)  # taken with manual ack, never acknowledged

    await (await channel.get_queue(t.STOCK_COMMANDS.name)).consume(hold, no_ack=False)
    await publish(connection, t.STOCK_COMMANDS.name, 36)
    await eventually(lambda: len(held) == 36, message="36 messages delivered to the holding consumer")

    report = await report_when(settings, engine, lambda r: r["checks"]["queues"].get("wedged"), "stock.commands reported wedged")
    queues = report["checks"]["queues"]
    assert report["status"] == "unhealthy" and not report["ok"]
    assert queues["wedged"] == [t.STOCK_COMMANDS.name]
    stock = queues["queues"][t.STOCK_COMMANDS.name]
    assert (stock["ready"], stock["unacked"], stock["consumers"], stock["wedged"]) == (0, 36, 1, True)
    assert stock["reason"] == f"36 unacknowledged, no ack for {WINDOW:g}s"
    assert "stock.commands: 36 unacknowledged" in queues["error"] and "restart" in queues["fix"]
    assert all(v["unacked"] == 0 and not v["wedged"] for name, v in queues["queues"].items() if name != t.STOCK_COMMANDS.name)


async def test_a_consumer_that_keeps_acking_is_not_wedged(
    settings: Settings,
    engine: AsyncEngine,
    connection: aio_pika.abc.AbstractConnection,
) -> None:
    """Unacknowledged messages all along, but acks keep coming: busy, not wedged."""
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=100)
    held: list[aio_pika.abc.AbstractIncomingMessage] = []

    async def hold(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        held.append(message)

    await (await channel.get_queue(t.STOCK_COMMANDS.name)).consume(hold, no_ack=False)
    await publish(connection, t.STOCK_COMMANDS.name, 40)
    await eventually(lambda: len(held) == 40, message="40 messages delivered")
    await report_when(
        settings,
        engine,
        lambda r: r["checks"]["queues"].get("queues", {}).get(t.STOCK_COMMANDS.name, {}).get("unacked"),
        "the management API counting the unacknowledged messages",
    )

    # A slow consumer: one ack every 0.4 s against a 2 s window, for three windows and
    # the statistics' lag. It acks at its own pace in a task of its own, so a slow health
    # check on a loaded machine cannot space the acks out past the window. Every report
    # meanwhile must see unacked messages, not a wedge.
    async def consume_slowly() -> None:
        for message in held[:-1]:
            await message.ack()
            await asyncio.sleep(0.4)  # the consumer's pace, not a wait for a condition

    consumer = asyncio.create_task(consume_slowly())
    reports = 0
    until = time.monotonic() + 3 * WINDOW + 2
    try:
        while time.monotonic() < until:
            report = await check_health(settings, engine=engine)
            stock = report["checks"]["queues"]["queues"][t.STOCK_COMMANDS.name]
            assert not stock["wedged"] and stock["unacked"] > 0, stock
            assert report["status"] == "healthy", report
            reports += 1
            await asyncio.sleep(0.2)  # spaces the reports out; nothing to wait for
    finally:
        consumer.cancel()
    assert reports >= 5


async def test_ready_messages_with_no_consumer_are_wedged(
    settings: Settings,
    engine: AsyncEngine,
    connection: aio_pika.abc.AbstractConnection,
) -> None:
    await publish(connection, t.PAYMENTS_COMMANDS.name, 7)
    report = await report_when(
        settings, engine, lambda r: r["checks"]["queues"].get("wedged"), "payments.commands reported wedged"
    )
    queues = report["checks"]["queues"]
    assert report["status"] == "unhealthy" and queues["wedged"] == [t.PAYMENTS_COMMANDS.name]
    payments = queues["queues"][t.PAYMENTS_COMMANDS.name]
    assert (payments["ready"], payments["unacked"], payments["consumers"]) == (7, 0, 0)
    assert payments["reason"] == f"7 ready, no consumer for {WINDOW:g}s"


async def test_a_queue_purged_a_moment_ago_is_not_wedged(
    settings: Settings,
    engine: AsyncEngine,
    connection: aio_pika.abc.AbstractConnection,
) -> None:
    """The management statistics still show the purged messages; the live count does not."""
    await publish(connection, t.PAYMENTS_COMMANDS.name, 5)
    await report_when(settings, engine, lambda r: r["checks"]["queues"].get("wedged"), "payments.commands reported wedged")
    channel = await connection.channel()
    await (await channel.get_queue(t.PAYMENTS_COMMANDS.name)).purge()
    await channel.close()
    report = await check_health(settings, engine=engine)
    queues = report["checks"]["queues"]
    assert report["status"] == "healthy" and queues["ok"] and queues["wedged"] == [], report
    assert queues["queues"][t.PAYMENTS_COMMANDS.name]["ready"] == 0


async def test_dead_letters_waiting_are_a_warning_not_a_wedge(
    settings: Settings,
    engine: AsyncEngine,
    connection: aio_pika.abc.AbstractConnection,
) -> None:
    await publish(connection, t.LEDGER_EVENTS.dlq, 3)
    report = await report_when(
        settings,
        engine,
        lambda r: r["checks"]["queues"].get("dlqs", {}).get(t.LEDGER_EVENTS.dlq, {}).get("ready") == 3,
        "the DLQ depth counted",
    )
    assert report["status"] == "healthy", report
    assert report["checks"]["dead_letters"]["queues"][t.LEDGER_EVENTS.name]["waiting_in_dlq"] == 3
    assert any("3 dead letters waiting in broker DLQs" in w for w in report["warnings"])


async def test_management_api_unreachable_is_degraded_never_healthy(
    engine: AsyncEngine,
    vhost_url: str,
) -> None:
    closed = f"http://guest:hunter2@127.0.0.1:{free_port()}/"
    report = await check_health(settings_for(engine, vhost_url, closed), engine=engine)
    queues = report["checks"]["queues"]
    assert report["status"] == "degraded" and not report["ok"], report
    assert report["checks"]["broker"]["ok"] and report["checks"]["database"]["ok"]
    assert queues["unavailable"] and queues["error"].startswith("broker queue stats unavailable: ")
    assert "COMPENSA_AMQP_MANAGEMENT_URL" in queues["fix"]

    env = stack_env(engine, vhost_url, COMPENSA_AMQP_MANAGEMENT_URL=closed, COMPENSA_HEALTH_STUCK_SECONDS="2")
    run = await compensa(env, "health")
    assert run.returncode == 1, run.stdout + run.stderr
    text = " ".join(run.stdout.split())
    assert "broker queue stats unavailable" in text and text.rstrip().endswith("degraded")
    assert "hunter2" not in run.stdout + run.stderr and "Traceback" not in run.stdout + run.stderr


async def test_a_pending_order_without_a_saga_is_unhealthy_and_named(
    settings: Settings,
    engine: AsyncEngine,
    management_url: str,
    vhost_url: str,
) -> None:
    order_id = f"lost-{uuid.uuid4().hex[:8]}"
    await place_order(
        engine,
        SystemClock(),
        order_id=order_id,
        customer_id="c-1",
        lines=[OrderLine(sku="sku-1", quantity=1, unit_price=250)],
        currency="EUR",
        payment_token="tok_ok",
    )
    tiny = settings_for(engine, vhost_url, management_url, health_stuck_seconds=0.2)
    report = await report_when(tiny, engine, lambda r: not r["checks"]["saga_starts"]["ok"], "the order reported without a saga")
    starts = report["checks"]["saga_starts"]
    assert report["status"] == "unhealthy"
    assert starts["pending_orders_without_saga"]["count"] == 1
    assert [o["order_id"] for o in starts["pending_orders_without_saga"]["oldest"]] == [order_id]
    assert order_id in starts["error"] and "compensa run --service saga" in starts["fix"]
    assert starts["sent_order_created_without_saga"]["count"] == 0  # its order.created is not sent yet
    default = settings_for(engine, vhost_url, management_url, health_stuck_seconds=60)
    assert (await check_health(default, engine=engine))["checks"]["saga_starts"]["ok"]  # not stuck yet under 60 s

    # The relay sent its order.created an hour ago and still no saga: the second way in.
    outbox = tables_for("orders").outbox
    async with engine.begin() as connection:
        await connection.execute(
            update(outbox).where(outbox.c.correlation_id == order_id).values(sent_at=SystemClock().now() - timedelta(hours=1))
        )
    starts = (await check_health(tiny, engine=engine))["checks"]["saga_starts"]
    assert starts["sent_order_created_without_saga"]["count"] == 1
    assert starts["sent_order_created_without_saga"]["oldest"][0] | {"sent_seconds_ago": 0} == {
        "correlation_id": order_id,
        "outbox": "orders",
        "sent_seconds_ago": 0,
    }

    # Its saga starts: nothing is missing any more.
    created = OrderCreated(
        order_id=order_id,
        customer_id="c-1",
        lines=(OrderLine(sku="sku-1", quantity=1, unit_price=250),),
        total=Money(amount=250, currency="EUR"),
        payment_token="tok_ok",
    )
    message = new_message(created, correlation_id=order_id, producer="test")
    async with UnitOfWork(engine, "saga", SystemClock(), incoming=message) as uow:
        await ORCHESTRATOR.handle(uow, message)
        await uow.commit()
    assert (await check_health(tiny, engine=engine))["checks"]["saga_starts"]["ok"]


async def test_overdue_saga_deadlines_mean_no_sweeper_runs(settings: Settings, engine: AsyncEngine) -> None:
    saga_id = f"late-{uuid.uuid4().hex[:8]}"
    past = VirtualClock(SystemClock().now() - timedelta(minutes=10))
    created = OrderCreated(
        order_id=saga_id,
        customer_id="c-1",
        lines=(OrderLine(sku="sku-1", quantity=1, unit_price=100),),
        total=Money(amount=100, currency="EUR"),
        payment_token="tok_ok",
    )
    message = new_message(created, correlation_id=saga_id, producer="test", occurred_at=past.now())
    async with UnitOfWork(engine, "saga", past, incoming=message) as uow:  # its step deadline passed 9+ minutes ago
        await ORCHESTRATOR.handle(uow, message)
        await uow.commit()

    deadlines = (await check_health(settings, engine=engine))["checks"]["deadlines"]
    assert not deadlines["ok"] and deadlines["overdue"] == 1 and deadlines["max_overdue_seconds"] > 500
    assert [d["saga_id"] for d in deadlines["oldest"]] == [saga_id]
    assert saga_id in deadlines["error"] and "sweeper" in deadlines["fix"]

    await ORCHESTRATOR.sweep_deadlines(lambda: UnitOfWork(engine, "saga", SystemClock()))  # what a running sweeper does
    assert (await check_health(settings, engine=engine))["checks"]["deadlines"]["ok"]


async def test_an_apps_missing_queues_name_the_command_that_declares_them(settings: Settings, engine: AsyncEngine) -> None:
    """The vhost has the order app's topology only: the trip app's queues are missing."""
    from examples.trip.app import app as trip_app

    report = await check_health(settings, engine=engine, app=trip_app, app_reference="examples.trip.app:app")
    broker = report["checks"]["broker"]
    assert not broker["ok"] and "flights.commands" in broker["error"]
    assert broker["fix"] == "run `compensa topology declare --app examples.trip.app:app`"
    default = await check_health(settings, engine=engine)
    assert default["checks"]["broker"]["ok"]
