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
from sqlalchemy import delete, insert, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts import (
    Money,
    OrderCreated,
    OrderLine,
    PaymentDeclined,
    ReserveStock,
    StockLine,
    StockReleased,
    StockReserved,
    encode,
    new_message,
)
from contracts.clock import Clock
from contracts.messages import Payload
from infra import topology as t
from infra.bootstrap import orchestrator_for
from infra.cli.common import explain_database_error, is_connection_failure, visible
from infra.clock import SystemClock, VirtualClock
from infra.dlq.archive import start_archive
from infra.dlq.query import DeadLetterFilter, missing_ids
from infra.dlq.query import purge as purge_dead_letters
from infra.dlq.tables import dead_letters
from infra.health import check_health, health_app
from infra.settings import Settings
from infra.transport.rabbit import RabbitTransport
from outbox.relay import Relay
from outbox.tables import tables_for
from outbox.uow import UnitOfWork
from sagas.tables import saga_history, saga_instances
from tests.harness.servers import Servers
from tests.integration.support import archived, dead_letter_headers, publish_dead_letter, purge, stack_env
from tests.support import COMPENSA, Run, assert_one_line_error, compensa, eventually

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
    return OrderCreated(
        order_id=saga_id,
        customer_id="c-1",
        lines=(OrderLine(sku="sku-1", quantity=2, unit_price=150),),
        total=Money(amount=300, currency="EUR"),
        payment_token="tok_decline_1",
    )


def until_declined(saga_id: str) -> list[Payload]:
    return [
        order(saga_id),
        StockReserved(order_id=saga_id, lines=(StockLine(sku="sku-1", quantity=2),)),
        PaymentDeclined(order_id=saga_id, reason="card declined"),
    ]


@pytest.fixture(scope="module")
async def sagas(pg_engine: AsyncEngine) -> dict[str, str]:
    """comp-1 compensated (cancelled) now; failed-1 compensation_failed 30 days ago; stuck-1 running since 2 h."""
    engine = pg_engine
    await drive(engine, SystemClock(), "comp-1", [*until_declined("comp-1"), StockReleased(order_id="comp-1")])
    old = VirtualClock(NOW - timedelta(days=30))
    await drive(engine, old, "failed-1", until_declined("failed-1"))
    for _ in range(20):  # the release is never confirmed: resend until the budget runs out
        old.advance(31)
        await ORCHESTRATOR.sweep_deadlines(lambda: UnitOfWork(engine, "saga", old))
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
        (None, "running"),
        ("running", "running"),
        ("running", "compensating"),
        ("compensating", "cancelled"),
    ]
    assert [[s["type"] for s in e["sent"]] for e in history] == [
        ["stock.reserve"],
        ["payment.charge"],
        ["stock.release"],
        ["order.cancelled"],
    ]
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
    sagas: dict[str, str],
    pg_engine: AsyncEngine,
    env: dict[str, str],
) -> None:
    assert_one_line_error(await compensa(env, "saga", "retry", "comp-1"), "saga comp-1 is cancelled, not compensation_failed")
    assert_one_line_error(await compensa(env, "saga", "retry", "nobody"), "no saga 'nobody'")
    outbox = tables_for("saga").outbox
    async with pg_engine.connect() as connection:
        before = (await connection.execute(select(outbox.c.id).where(outbox.c.correlation_id == "failed-1"))).scalars().all()

    run = await compensa(env, "saga", "retry", "failed-1", "--json")
    assert run.returncode == 0, run.stderr
    assert run.json() | {"note": None} == {
        "saga_id": "failed-1",
        "status": "compensating",
        "trigger": "operator:retry_compensation",
        "note": None,
        "sent": ["stock.release"],
    }
    async with pg_engine.connect() as connection:
        sent = (
            (
                await connection.execute(
                    select(outbox.c.type).where(outbox.c.correlation_id == "failed-1", outbox.c.id.not_in(before))
                )
            )
            .scalars()
            .all()
        )
        status = (
            await connection.execute(select(saga_instances.c.status).where(saga_instances.c.saga_id == "failed-1"))
        ).scalar_one()
        last = (
            await connection.execute(
                select(saga_history.c.trigger)
                .where(saga_history.c.saga_id == "failed-1")
                .order_by(saga_history.c.version.desc())
                .limit(1)
            )
        ).scalar_one()
        deadline = (
            await connection.execute(select(saga_instances.c.deadline_kind).where(saga_instances.c.saga_id == "failed-1"))
        ).scalar_one()
    assert (sent, status, last, deadline) == (["stock.release"], "compensating", "operator:retry_compensation", "compensation")


async def test_dlq_show_and_list_tell_where_the_saga_of_a_dead_letter_stands(
    sagas: dict[str, str],
    pg_engine: AsyncEngine,
    rabbit: RabbitTransport,
    amqp_channel: aio_pika.abc.AbstractChannel,
    amqp_url: str,
    env: dict[str, str],
) -> None:
    async with pg_engine.begin() as connection:
        await connection.execute(delete(dead_letters))
    await purge(rabbit.connection, *(q.dlq for q in t.WORK_QUEUES))
    release = new_message(
        ReserveStock(order_id="comp-1", lines=(StockLine(sku="sku-1", quantity=2),)), correlation_id="comp-1", producer="saga"
    )
    earlier = NOW - timedelta(hours=3)
    await publish_dead_letter(amqp_channel, t.STOCK_COMMANDS, release, reason="RuntimeError: disk full", failed_at=earlier)
    other = new_message(
        ReserveStock(order_id="zzz", lines=(StockLine(sku="sku-2", quantity=1),)), correlation_id="zzz", producer="saga"
    )
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
    assert (letter["queue"], letter["type"], letter["reason"], letter["message_id"]) == (
        "stock.commands",
        "stock.reserve",
        "RuntimeError: disk full",
        str(release.message_id),
    )
    assert letter["body"]["payload"] == {"order_id": "comp-1", "lines": [{"sku": "sku-1", "quantity": 2}]}
    assert letter["headers"][t.H_ORIGINAL_QUEUE] == "stock.commands"
    assert saga["status"] == "cancelled"
    assert [e["trigger"] for e in saga["last_transitions"]] == [
        "order.created",
        "stock.reserved",
        "payment.declined",
        "stock.released",
    ]
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
        ("payments.commands", "contract", 1),
        ("stock.commands", "contract", 1),
        ("stock.commands", "handler_error", 1),
    ]
    assert_one_line_error(await compensa(env, "dlq", "show", "999999"), "no dead letter 999999")


async def test_health_reports_a_lagging_relay_then_healthy_and_so_does_get_health(
    sagas: dict[str, str],
    pg_engine: AsyncEngine,
    rabbit: RabbitTransport,
    amqp_url: str,
    env: dict[str, str],
    servers: Servers,
) -> None:
    management_url = servers.amqp_management_url
    env = {**env, "COMPENSA_AMQP_MANAGEMENT_URL": management_url}
    settings = Settings(
        database_url=env["COMPENSA_DATABASE_URL"], amqp_url=amqp_url, amqp_management_url=management_url, redis_url=None
    )
    lagging = await compensa(env, "health", "--json")  # the sagas' commands were never relayed; some are 30 days old
    assert lagging.returncode == 1
    report = lagging.json()
    assert report["status"] == "unhealthy"
    assert report["checks"]["database"]["ok"] and report["checks"]["broker"]["ok"]
    assert not report["checks"]["relay"]["ok"] and "compensa relay" in report["checks"]["relay"]["fix"]
    assert report["checks"]["relay"]["outboxes"]["saga"]["pending"] > 0
    # stuck-1 waits since 2 h for a reply whose deadline no sweeper fired.
    assert not report["checks"]["deadlines"]["ok"] and [d["saga_id"] for d in report["checks"]["deadlines"]["oldest"]] == [
        "stuck-1"
    ]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=health_app(settings)), base_url="http://test") as client:
        response = await client.get("/health")
    assert response.status_code == 503 and response.json()["status"] == "unhealthy"

    await ORCHESTRATOR.sweep_deadlines(
        lambda: UnitOfWork(pg_engine, "saga", SystemClock())
    )  # the sweeper runs: stuck-1 compensates
    relay = Relay(pg_engine, "saga", rabbit, SystemClock())
    await relay.drain()
    # Nothing consumes here: ready messages with no consumer would be a wedged queue.
    await purge(rabbit.connection, *(q.name for q in t.WORK_QUEUES))
    healthy = await compensa(env, "health")
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert "healthy" in healthy.stdout and "unhealthy" not in healthy.stdout
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=health_app(settings)), base_url="http://test") as client:
        response = await client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["ok"] and set(body["checks"]) == {
        "database",
        "relay",
        "broker",
        "queues",
        "saga_starts",
        "deadlines",
        "redis",
        "dead_letters",
        "circuit_breakers",
    }
    assert set(body["checks"]["dead_letters"]["queues"]) == {q.name for q in t.WORK_QUEUES}

    broken = await check_health(Settings(database_url=env["COMPENSA_DATABASE_URL"], amqp_url="amqp://guest:guest@127.0.0.1:1/"))
    assert not broken["ok"] and broken["status"] == "unhealthy" and broken["checks"]["database"]["ok"]
    assert "COMPENSA_AMQP_URL" in broken["checks"]["broker"]["fix"]


async def test_health_serve_answers_get_health_over_http(sagas: dict[str, str], env: dict[str, str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = await asyncio.create_subprocess_exec(
        COMPENSA,
        "health",
        "--serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
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


# ---------------------------------------------------------------- stored data in an 80-column terminal

NASTY = ("[/]", "[bold red]x", "\x1b[31mred")


def rendered(run: Run) -> str:
    """Exit 0, no traceback, no raw control character, no table line wider than 80 columns."""
    assert run.returncode == 0, (run.returncode, run.stdout, run.stderr)
    assert "Traceback" not in run.stdout + run.stderr and "MarkupError" not in run.stdout + run.stderr
    assert not [ch for ch in run.stdout + run.stderr if not ch.isprintable() and ch != "\n"], run.stdout
    assert all(len(line) <= 80 for line in run.stdout.splitlines() if line[:1] in "┏┃┡│└"), run.stdout
    return run.stdout


def column(stdout: str, header: str) -> list[str]:
    lines = stdout.splitlines()
    headers = [h.strip() for h in next(line for line in lines if line.startswith("┃")).split("┃")[1:-1]]
    return [line.split("│")[headers.index(header) + 1].strip() for line in lines if line.startswith("│")]


async def test_stored_markup_and_escapes_render_at_80_columns_with_every_id_whole(
    sagas: dict[str, str],
    pg_engine: AsyncEngine,
    rabbit: RabbitTransport,
    amqp_channel: aio_pika.abc.AbstractChannel,
    amqp_url: str,
    env: dict[str, str],
) -> None:
    """`[/]`, `[bold red]x` and `\\x1b[31m` in saga ids, reasons and types: as the archive keeps them, and in old rows."""
    narrow = {**env, "COLUMNS": "80"}
    async with pg_engine.begin() as connection:
        await connection.execute(delete(dead_letters))
    await purge(rabbit.connection, *(q.dlq for q in t.WORK_QUEUES))
    # Sagas: two driven through the orchestrator (the contracts allow markup), one old row with an escape.
    for saga_id in NASTY[:2]:
        await drive(pg_engine, SystemClock(), saga_id, until_declined(saga_id))
    async with pg_engine.begin() as connection:
        await connection.execute(
            insert(saga_instances).values(
                saga_id=NASTY[2],
                definition="order",
                status="running",
                step=0,
                data="{}",
                done_steps="[]",
                pending_compensations="[]",
                compensation_attempts=0,
                reason="[bold red]stuck\x1b[2J",
                version=1,
                started_at=NOW,
                updated_at=NOW,
            )
        )
        await connection.execute(
            insert(saga_history).values(
                saga_id=NASTY[2],
                version=1,
                at=NOW,
                trigger="order.created\x1b[0m",
                message_id=None,
                causation_id=None,
                from_status=None,
                to_status="running",
                step=None,
                note="[/]",
                sent="[]",
            )
        )
    # Dead letters: what arrived, archived as is (a saga header with an escape, a reason with markup) ...
    for saga_id in NASTY:
        message = new_message(
            ReserveStock(order_id="[bold red]x", lines=(StockLine(sku="sku-[/]", quantity=1),)),
            correlation_id="[bold red]x",
            producer="saga",
        )
        headers = dead_letter_headers(
            t.STOCK_COMMANDS, message.type, reason=f"RuntimeError: [bold red]disk\x1b[31m full [/] {saga_id}"
        )
        headers[t.H_SAGA_ID] = saga_id
        await amqp_channel.default_exchange.publish(
            aio_pika.Message(
                encode(message.envelope),
                headers=headers,
                message_id=str(message.message_id),
                type=message.type,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=t.STOCK_COMMANDS.dlq,
        )
    transport = RabbitTransport(amqp_url)
    await transport.connect()
    handler, subscriptions = await start_archive(transport, pg_engine, SystemClock(), prefetch=10)
    try:
        await eventually(lambda: handler.archived == 3, timeout=10)
    finally:
        for subscription in subscriptions:
            await subscription.stop(5)
        await transport.close()
    # ... and an old row whose type and reason class hold markup and escapes.
    async with pg_engine.begin() as connection:
        await connection.execute(
            insert(dead_letters).values(
                dedup_key="old-row",
                queue="stock.commands",
                dlq="stock.commands.dlq",
                message_id="[/]",
                type="stock.reserve[/]\x1b[31m",
                version=1,
                saga_id="[/]",
                reason_class="handler_error[bold]",
                reason="[/]\x1b[2J",
                attempts=1,
                original_exchange="",
                original_routing_key="stock.reserve",
                first_failure_at=NOW,
                last_failure_at=NOW,
                body="{[/]",
                body_encoding="utf-8",
                headers="{}",
                archived_at=NOW,
                status="new",
            )
        )
    stored = {row.id: row.saga_id for row in await archived(pg_engine)}
    assert sorted(stored.values()) == sorted([*NASTY, "[/]"])

    listed = rendered(await compensa(narrow, "dlq", "list"))
    assert sorted(int(i) for i in column(listed, "id")) == sorted(stored)  # the ids `dlq show` needs, every one, whole
    assert sorted(column(listed, "saga")) == sorted(visible(s) for s in stored.values())
    rendered(await compensa(narrow, "dlq", "list", "--group"))
    for dead_letter_id, saga_id in stored.items():
        shown = rendered(await compensa(narrow, "dlq", "show", str(dead_letter_id)))
        assert f"dead letter {dead_letter_id}" in shown and f"saga      {visible(saga_id)}" in shown
    old = rendered(await compensa(narrow, "dlq", "show", str(max(stored))))
    assert "stock.reserve[/]\\x1b[31m v1" in old and "handler_error[bold]: [/]\\x1b[2J" in old and "{[/]" in old
    archived_from_queue = rendered(await compensa(narrow, "dlq", "show", str(min(stored))))
    assert "RuntimeError: [bold red]disk\\x1b[31m full [/] [/]" in " ".join(archived_from_queue.split())

    sagas_listed = rendered(await compensa(narrow, "saga", "list"))
    assert sorted(column(sagas_listed, "saga")) == sorted(visible(s) for s in [*NASTY, "comp-1", "failed-1", "stuck-1"])
    for saga_id in NASTY:
        shown = rendered(await compensa(narrow, "saga", "show", saga_id))
        assert shown.startswith(f"saga {visible(saga_id)}: ")
        assert "…" not in shown  # the history wraps and folds to 80 columns, cutting nothing
        mermaid = rendered(await compensa(narrow, "saga", "show", saga_id, "--mermaid"))
        assert f"participant Saga as Saga {visible(saga_id)}" in mermaid
    assert "[bold red]stuck\\x1b[2J" in " ".join(rendered(await compensa(narrow, "saga", "show", NASTY[2])).split())


async def test_huge_values_and_refused_queries_are_one_line_errors_on_postgresql(
    pg_engine: AsyncEngine, env: dict[str, str]
) -> None:
    assert_one_line_error(await compensa(env, "dlq", "replay", "1-40000"), "too many dead-letter ids (1-40000", "at most 10,000")
    assert_one_line_error(await compensa(env, "dlq", "show", "99999999999999999999"), "bad dead-letter id")
    assert_one_line_error(
        await compensa(env, "saga", "list", "--older-than", "99999999999d"), "--older-than:", "longer than 100 years"
    )
    assert_one_line_error(await compensa(env, "dlq", "list", "--since", "9" * 400 + "s"), "--since:", "longer than 100 years")
    assert_one_line_error(await compensa(env, "dlq", "list", "--until", "0001-01-01T00:00:00+05:00"), "--until:", "out of range")
    # asyncpg refuses a statement with more than 32,767 bind parameters: a refused query, not an unreachable database.
    with pytest.raises(DBAPIError) as refused:
        async with pg_engine.connect() as connection:
            await connection.execute(select(dead_letters.c.id).where(dead_letters.c.id.in_(list(range(40_000)))))
    assert not is_connection_failure(refused.value)
    explained = explain_database_error(refused.value)
    assert explained.startswith("the database refused the query: ") and explained.endswith(
        "the number of query arguments cannot exceed 32767"
    )
    # The queries that name dead letters one by one batch them instead.
    many = tuple(range(1, 40_001))
    async with pg_engine.connect() as connection:
        assert len(await missing_ids(connection, many)) <= 40_000
    # (status purged: nothing matches, so the other tests' rows stay as they are; the statements run all the same)
    assert await purge_dead_letters(pg_engine, DeadLetterFilter(ids=many, status="purged"), NOW) == 0
