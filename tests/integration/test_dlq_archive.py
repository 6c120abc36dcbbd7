"""The dead-letter archive on the real RabbitMQ and PostgreSQL.

Poison messages (a bad payload, an undecodable body, a failing handler, a transient
failure past the maximum) end in `dead_letters` with their reasons; a dead letter
delivered twice is stored once; the archive process killed mid-stream loses nothing
and stores nothing twice. Dead letters the database could not hold as received
(integers past int4, NUL, lone surrogates, forged x-death) never wedge the archive,
on PostgreSQL and on SQLite; a row the database still refuses is quarantined.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts import ReserveStock, StockLine, TransientError, encode, new_message
from contracts.messages import PaymentAuthorized
from infra import topology as t
from infra.clock import SystemClock
from infra.db import create_engine
from infra.dlq.archive import ORIGINALS_HEADER, QUARANTINED_HEADERS_KEY, DeadLetterArchive, dead_letter_row, start_archive
from infra.dlq.replay import prepare
from infra.dlq.tables import INTEGER_MAX, QUARANTINED, UNDECODABLE, dead_letters
from infra.pipeline import MessageProcessor, RetryPolicy
from infra.schema import upgrade
from infra.topology import STOCK_COMMANDS
from infra.transport.memory import MemoryBroker, MemoryDelivery, StoredMessage
from infra.transport.rabbit import RabbitTransport
from outbox.tables import tables_for
from tests.integration.support import archived, publish_dead_letter, purge, stack_env
from tests.support import COMPENSA, eventually

pytestmark = pytest.mark.integration

clock = SystemClock()
DLQS = [q.dlq for q in t.WORK_QUEUES]


@pytest.fixture(autouse=True)
async def empty(pg_engine: AsyncEngine, rabbit: RabbitTransport) -> None:
    async with pg_engine.begin() as connection:
        await connection.execute(delete(dead_letters))
        await connection.execute(delete(tables_for("stock").inbox))
    await purge(rabbit.connection, *DLQS)


@pytest.fixture
async def archive(pg_engine: AsyncEngine, amqp_url: str) -> AsyncIterator[DeadLetterArchive]:
    """The archive consuming every DLQ on a connection of its own."""
    transport = RabbitTransport(amqp_url)
    await transport.connect()
    handler, subscriptions = await start_archive(transport, pg_engine, clock, prefetch=20)
    try:
        yield handler
    finally:
        for subscription in subscriptions:
            await subscription.stop(grace_seconds=5)
        await transport.close()


def reservation(order_id: str, quantity: int = 1) -> Any:
    return new_message(
        ReserveStock(order_id=order_id, lines=(StockLine(sku="sku-1", quantity=quantity),)),
        correlation_id=order_id,
        producer="saga",
    )


async def publish(channel: aio_pika.abc.AbstractChannel, body: bytes, message_id: str, correlation_id: str) -> None:
    await channel.default_exchange.publish(
        aio_pika.Message(
            body,
            message_id=message_id,
            correlation_id=correlation_id,
            type="stock.reserve",
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        ),
        routing_key=STOCK_COMMANDS.name,
    )


async def test_poison_messages_end_in_the_archive_with_their_reasons(
    pg_engine: AsyncEngine,
    rabbit: RabbitTransport,
    consume: Any,
    amqp_channel: aio_pika.abc.AbstractChannel,
    archive: DeadLetterArchive,
    retry_policy: RetryPolicy,
) -> None:
    async def handle(_uow: Any, message: Any) -> None:
        if message.payload.order_id.startswith("crash"):
            raise RuntimeError(f"handler bug on {message.payload.order_id}")
        if message.payload.order_id.startswith("flaky"):
            raise TransientError("gateway timeout")

    await consume(MessageProcessor(pg_engine, "stock", STOCK_COMMANDS.name, {"stock.reserve": handle}, clock, retry=retry_policy))
    crash, flaky, good = reservation("crash-1"), reservation("flaky-1"), reservation("good-1")
    bad_payload = reservation("bad-1").envelope.model_copy(update={"payload": {"order_id": "bad-1", "lines": []}})
    for message in (crash, flaky, good):
        await publish(amqp_channel, encode(message.envelope), str(message.message_id), message.correlation_id)
    await publish(amqp_channel, encode(bad_payload), str(bad_payload.message_id), "bad-1")
    await publish(amqp_channel, b"\x00\xffnot json at all", "raw-1", "raw-saga")

    rows = await eventually(lambda: _when_count(pg_engine, 4), timeout=20, message="four dead letters archived")
    by_saga = {row.saga_id: row for row in rows}

    assert set(by_saga) == {"crash-1", "flaky-1", "bad-1", "raw-saga"}
    assert (by_saga["crash-1"].reason_class, by_saga["crash-1"].reason) == (
        "handler_error",
        "RuntimeError: handler bug on crash-1",
    )
    assert by_saga["crash-1"].attempts == 1 and by_saga["crash-1"].message_id == str(crash.message_id)
    assert by_saga["flaky-1"].reason_class == "transient_exhausted"
    assert by_saga["flaky-1"].attempts == retry_policy.max_attempts
    assert by_saga["flaky-1"].reason.startswith(f"gave up after {retry_policy.max_attempts} attempts")
    assert by_saga["flaky-1"].first_failure_at < by_saga["flaky-1"].last_failure_at
    assert by_saga["bad-1"].reason_class == "contract" and "lines" in by_saga["bad-1"].reason
    assert by_saga["bad-1"].type == "stock.reserve"
    assert by_saga["raw-saga"].type == UNDECODABLE and by_saga["raw-saga"].body_encoding == "base64"
    assert by_saga["raw-saga"].reason.startswith("body is not valid JSON")
    for row in rows:
        assert (row.queue, row.dlq, row.status) == ("stock.commands", "stock.commands.dlq", "new")
        assert (row.original_exchange, row.original_routing_key) == ("", "stock.commands")  # published straight to the queue
        assert json.loads(row.headers)[t.H_REASON_CLASS] == row.reason_class
    # Acknowledged only after commit, and acknowledged: nothing left in the DLQ.
    assert await _depth(rabbit, STOCK_COMMANDS.dlq) == 0


async def _when_count(engine: AsyncEngine, count: int) -> list[Any]:
    rows = await archived(engine)
    return rows if len(rows) >= count else []


async def _depth(transport: RabbitTransport, name: str) -> int:
    channel = await transport.connection.channel()
    try:
        queue = await channel.declare_queue(name, passive=True)
        return queue.declaration_result.message_count
    finally:
        await channel.close()


async def test_dead_letters_of_every_queue_are_archived_and_a_redelivered_one_is_stored_once(
    pg_engine: AsyncEngine,
    rabbit: RabbitTransport,
    amqp_channel: aio_pika.abc.AbstractChannel,
    archive: DeadLetterArchive,
) -> None:
    event = new_message(
        PaymentAuthorized(order_id="ord-7", payment_id="pay-7", amount={"amount": 100, "currency": "EUR"}),
        correlation_id="ord-7",
        producer="payments",
    )
    # The same dead letter twice, as after a crash between the archive's commit and its ack.
    for _ in range(2):
        await publish_dead_letter(amqp_channel, t.LEDGER_EVENTS, event, failed_at=clock.now().replace(microsecond=0))
    await publish_dead_letter(amqp_channel, t.SAGA_EVENTS, event, reason_class="business_rule", reason="late")

    await eventually(lambda: archive.archived + archive.duplicates >= 3, timeout=10)
    rows = await archived(pg_engine)

    assert archive.duplicates == 1
    assert sorted((r.queue, r.reason_class) for r in rows) == [
        ("ledger.events", "handler_error"),
        ("saga.events", "business_rule"),
    ]
    assert {r.message_id for r in rows} == {str(event.message_id)}
    assert await _depth(rabbit, t.LEDGER_EVENTS.dlq) == 0


async def test_the_archive_process_killed_mid_stream_loses_nothing_and_stores_nothing_twice(
    pg_engine: AsyncEngine,
    amqp_url: str,
    rabbit: RabbitTransport,
    amqp_channel: aio_pika.abc.AbstractChannel,
) -> None:
    total = 3000
    sent = set()
    for n in range(total):
        message = reservation(f"kill-{n}")
        queue = t.WORK_QUEUES[n % len(t.WORK_QUEUES)]
        await publish_dead_letter(amqp_channel, queue, message)
        sent.add(str(message.message_id))
    env = stack_env(pg_engine, amqp_url, COMPENSA_PREFETCH="50")

    async def start() -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            COMPENSA,
            "run",
            "--service",
            "dlq",
            "--no-relay",
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )

    async def count() -> int:
        async with pg_engine.connect() as connection:
            return (await connection.execute(select(func.count()).select_from(dead_letters))).scalar_one()

    async def dlq_depth() -> int:
        return sum([await _depth(rabbit, name) for name in DLQS])

    first = await start()
    await eventually(lambda: _at_least(count, 200), timeout=30, interval=0.01, message="archive started")
    first.send_signal(signal.SIGKILL)  # mid-stream: committed-but-unacked and unacked deliveries in flight
    await first.wait()
    stored_before_restart = await count()
    assert stored_before_restart < total, "the archive finished before it could be killed; raise `total`"
    # Nothing lost: every message is either archived or back in a DLQ.
    await eventually(lambda: _at_least_sum(count, dlq_depth, total), timeout=15)

    second = await start()
    try:
        await eventually(lambda: _equals(count, total), timeout=60, message="all dead letters archived after the restart")
        await eventually(lambda: _equals(dlq_depth, 0), timeout=15, message="every DLQ acknowledged")
    finally:
        second.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(second.communicate(), 30)
    assert second.returncode == 0, stderr.decode()[-2000:]
    async with pg_engine.connect() as connection:
        ids = set((await connection.execute(select(dead_letters.c.message_id))).scalars())
    assert ids == sent


async def _at_least(measure: Any, value: int) -> bool:
    return await measure() >= value


async def _at_least_sum(a: Any, b: Any, value: int) -> bool:
    return await a() + await b() >= value


async def _equals(measure: Any, value: int) -> bool:
    return await measure() == value


async def test_the_archive_keeps_a_delivery_unacknowledged_until_its_row_commits(
    pg_engine: AsyncEngine,
    rabbit: RabbitTransport,
    amqp_channel: aio_pika.abc.AbstractChannel,
    amqp_url: str,
) -> None:
    """A database outage: nothing is acknowledged, and the row lands once the database is back."""
    failures = 3

    class FlakyArchive(DeadLetterArchive):
        async def store(self, rows: Any) -> set[str]:
            nonlocal failures
            if failures:
                failures -= 1
                raise ConnectionRefusedError("database down")
            return await super().store(rows)

    transport = RabbitTransport(amqp_url)
    await transport.connect()
    handler = FlakyArchive(pg_engine, clock, max_backoff_seconds=0.05)
    subscription = await transport.consume(t.DEAD_LETTER_QUEUES[1], handler, 5)
    try:
        await publish_dead_letter(amqp_channel, STOCK_COMMANDS, reservation("outage-1"))
        await eventually(lambda: handler.archived == 1, timeout=10)
    finally:
        await subscription.stop(5)
        await transport.close()
    assert failures == 0
    assert [r.saga_id for r in await archived(pg_engine)] == ["outage-1"]
    assert await _depth(rabbit, STOCK_COMMANDS.dlq) == 0


# ---------------------------------------------------------------- dead letters the database cannot hold as received

CASE = "x-test-case"  # every message says which case it is, in a plain ASCII header


@pytest.fixture(scope="module")
async def sqlite_engine(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[AsyncEngine]:
    path: Path = tmp_path_factory.mktemp("dlq-archive") / "compensa.db"
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    await upgrade(engine)
    yield engine
    await engine.dispose()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def store_engine(request: pytest.FixtureRequest) -> AsyncEngine:
    """The archive's database: SQLite (aiosqlite, a temp file) and the real PostgreSQL."""
    return request.getfixturevalue({"sqlite": "sqlite_engine", "postgres": "pg_engine"}[request.param])


@pytest.fixture
async def store(store_engine: AsyncEngine) -> AsyncEngine:
    async with store_engine.begin() as connection:
        await connection.execute(delete(dead_letters))
    return store_engine


async def _archive_on(engine: AsyncEngine, amqp_url: str) -> tuple[DeadLetterArchive, RabbitTransport, list[Any]]:
    transport = RabbitTransport(amqp_url)
    await transport.connect()
    handler, subscriptions = await start_archive(transport, engine, clock, prefetch=20)
    return handler, transport, subscriptions


async def _stop(transport: RabbitTransport, subscriptions: list[Any]) -> None:
    for subscription in subscriptions:
        await subscription.stop(grace_seconds=5)
    await transport.close()


def _envelope(order_id: str, **changes: Any) -> dict[str, Any]:
    """An envelope as JSON-ready data, with what no producer of ours would send."""
    envelope = reservation("placeholder").envelope.model_dump(mode="json")
    envelope["correlation_id"] = envelope["payload"]["order_id"] = order_id
    envelope.update(changes)
    return envelope


def _poison() -> list[tuple[str, bytes, dict[str, Any], dict[str, Any]]]:
    """(case, body, extra headers, AMQP properties) of every dead letter class that wedged the archive."""
    stamp = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
    nul_in_body = encode(reservation("nul-body").envelope).replace(b'"saga"', b'"sa\x00ga"')
    assert b"\x00" in nul_in_body
    forged_death = {
        "count": 2**31,
        "reason": "rejected",
        "queue": "stock.commands",
        "exchange": "",
        "routing-keys": ["stock.reserve"],
        "time": stamp,
    }
    return [
        ("version-2**31", json.dumps(_envelope("version-31", version=2**31)).encode(), {}, {}),
        ("version-2**63", json.dumps(_envelope("version-63", version=2**63)).encode(), {}, {}),
        ("attempt-2**31", encode(reservation("attempt-31").envelope), {t.H_ATTEMPT: 2**31}, {}),
        ("nul-raw-in-body", nul_in_body, {}, {}),
        # json.dumps writes "\u0000" and "\ud800" as escapes: the bodies themselves are plain ASCII.
        ("nul-escaped-correlation-id", json.dumps(_envelope("nul\x00corr")).encode(), {}, {}),
        ("lone-surrogate-correlation-id", json.dumps(_envelope("sur\ud800rogate")).encode(), {}, {}),
        ("nul-message-id-property", encode(reservation("nul-mid").envelope), {}, {"message_id": "mid\x00nul"}),
        ("nul-correlation-id-property", encode(reservation("nul-cid").envelope), {}, {"correlation_id": "cid\x00nul"}),
        (
            "nul-in-headers",
            encode(reservation("nul-hdr").envelope),
            {t.H_REASON: "boom\x00", "note": bytearray(b"a\x00\xff")},
            {},
        ),
        ("x-death-count-2**31", b'{"not": "an envelope"}', {"x-death": [forged_death]}, {}),
        ("x-death-count-2**62", encode(reservation("death-62").envelope), {"x-death": [dict(forged_death, count=2**62)]}, {}),
    ]


async def _publish_raw(
    channel: aio_pika.abc.AbstractChannel, case: str, body: bytes, headers: dict[str, Any], properties: dict[str, Any]
) -> None:
    """Publish into stock.commands.dlq as the pipeline would, or as a forger would (no compensa headers)."""
    if "x-death" in headers:
        all_headers = {CASE: case, **headers}
    else:
        all_headers = {
            CASE: case,
            t.H_REASON_CLASS: "handler_error",
            t.H_REASON: "RuntimeError: boom",
            t.H_ATTEMPT: 1,
            t.H_ORIGINAL_EXCHANGE: "compensa.commands",
            t.H_ORIGINAL_ROUTING_KEY: "stock.reserve",
            t.H_ORIGINAL_QUEUE: STOCK_COMMANDS.name,
            **headers,
        }
    await channel.default_exchange.publish(
        aio_pika.Message(
            body,
            headers=all_headers,
            message_id=properties.get("message_id", str(uuid.uuid4())),
            correlation_id=properties.get("correlation_id"),
            type="stock.reserve",
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        ),
        routing_key=STOCK_COMMANDS.dlq,
    )


def _case(row: Any) -> str:
    headers = json.loads(row.headers)
    if QUARANTINED_HEADERS_KEY in headers:
        return headers[QUARANTINED_HEADERS_KEY]
    return headers[CASE]


def _raw_body(row: Any) -> bytes:
    return base64.b64decode(row.body) if row.body_encoding == "base64" else row.body.encode()


async def _rows_by_case(engine: AsyncEngine, count: int) -> dict[str, Any]:
    rows = await archived(engine)
    return {_case(row): row for row in rows} if len(rows) >= count else {}


async def test_no_dead_letter_wedges_the_archive_and_each_is_stored_as_the_database_can_hold_it(
    store: AsyncEngine,
    amqp_url: str,
    rabbit: RabbitTransport,
    amqp_channel: aio_pika.abc.AbstractChannel,
) -> None:
    poison = _poison()
    sent: dict[str, bytes] = {}
    handler, transport, subscriptions = await _archive_on(store, amqp_url)
    try:
        for n, (case, body, headers, properties) in enumerate(poison):
            good = encode(reservation(f"good-{n}").envelope)
            await _publish_raw(amqp_channel, f"good-{n}", good, {}, {})
            await _publish_raw(amqp_channel, case, body, headers, properties)
            sent[f"good-{n}"], sent[case] = good, body
        rows = await eventually(lambda: _rows_by_case(store, len(sent)), timeout=20, message="every dead letter archived")
        # Not wedged: a good dead letter sent after all the poison is archived too.
        late = encode(reservation("late-good").envelope)
        await _publish_raw(amqp_channel, "late-good", late, {}, {})
        sent["late-good"] = late
        rows = await eventually(lambda: _rows_by_case(store, len(sent)), timeout=10, message="the late dead letter archived")
        await eventually(lambda: _equals(lambda: _depth(rabbit, STOCK_COMMANDS.dlq), 0), timeout=10, message="the DLQ emptied")
    finally:
        await _stop(transport, subscriptions)

    assert set(rows) == set(sent) and len(await archived(store)) == len(sent)
    # Every row was storable as built: no batch refused, nothing quarantined.
    assert (handler.archived, handler.quarantined, handler.batch_splits) == (len(sent), 0, 0)
    for case, row in rows.items():
        assert _raw_body(row) == sent[case], case  # the exact bytes received, whatever they are
        assert row.reason_class != QUARANTINED and row.queue == STOCK_COMMANDS.name
        for column in ("message_id", "saga_id", "reason", "headers", "body", "original_exchange", "original_routing_key"):
            value = getattr(row, column) or ""
            assert "\x00" not in value, (case, column)
            value.encode("utf-8")  # no lone surrogate either
    assert rows["version-2**31"].version is None and rows["version-2**63"].version is None
    assert rows["attempt-2**31"].attempts == INTEGER_MAX
    assert json.loads(rows["attempt-2**31"].headers)[ORIGINALS_HEADER]["attempts"] == str(2**31)
    assert rows["nul-raw-in-body"].body_encoding == "base64"
    assert rows["nul-message-id-property"].message_id == "mid\u2400nul"
    assert json.loads(rows["nul-message-id-property"].headers)[ORIGINALS_HEADER]["message_id"] == repr("mid\x00nul")
    assert rows["nul-correlation-id-property"].saga_id == "nul-cid"  # the envelope's; the property's kept as original
    assert json.loads(rows["nul-correlation-id-property"].headers)[ORIGINALS_HEADER]["correlation_id"] == repr("cid\x00nul")
    assert json.loads(rows["nul-in-headers"].headers)[t.H_REASON] == "boom\u2400" == rows["nul-in-headers"].reason
    assert "boom\\x00" in json.loads(rows["nul-in-headers"].headers)[ORIGINALS_HEADER]["headers"]
    assert "\ud800" not in (rows["lone-surrogate-correlation-id"].saga_id or "")
    for case in ("x-death-count-2**31", "x-death-count-2**62"):  # when the broker passes a forged x-death on
        if "x-death" in json.loads(rows[case].headers):
            assert rows[case].attempts == INTEGER_MAX and rows[case].reason_class == "broker_rejected"
    if store.dialect.name == "postgresql":
        async with store.connect() as connection:  # and every stored headers document is valid jsonb
            cast = await connection.execute(text("SELECT count(*) FROM dead_letters WHERE headers::jsonb IS NOT NULL"))
            assert cast.scalar_one() == len(sent)
    # Replay still reads a base64 body: the NUL one parses (and is refused for what it is, not for its encoding).
    refused = prepare(rows["nul-raw-in-body"], None, {q.name: q for q in t.WORK_QUEUES})
    assert isinstance(refused, str) and "not valid JSON" in refused


@pytest.fixture
async def refusing(store: AsyncEngine) -> AsyncIterator[AsyncEngine]:
    """The archive's table refuses rows whose saga is `refuse-me`, as a database refuses bad data."""
    async with store.begin() as connection:
        if store.dialect.name == "postgresql":
            await connection.execute(
                text(
                    "CREATE FUNCTION refuse_dead_letter() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                    "IF NEW.saga_id = 'refuse-me' THEN RAISE EXCEPTION 'refused by the test' USING ERRCODE = '22023'; END IF; "
                    "RETURN NEW; END $$"
                )
            )
            await connection.execute(
                text(
                    "CREATE TRIGGER refuse_dead_letter BEFORE INSERT ON dead_letters "
                    "FOR EACH ROW EXECUTE FUNCTION refuse_dead_letter()"
                )
            )
        else:
            await connection.execute(
                text(
                    "CREATE TRIGGER refuse_dead_letter BEFORE INSERT ON dead_letters WHEN NEW.saga_id = 'refuse-me' "
                    "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
                )
            )
    try:
        yield store
    finally:
        async with store.begin() as connection:
            await connection.execute(
                text("DROP TRIGGER refuse_dead_letter" + (" ON dead_letters" if store.dialect.name == "postgresql" else ""))
            )
            if store.dialect.name == "postgresql":
                await connection.execute(text("DROP FUNCTION refuse_dead_letter()"))


async def test_a_row_the_database_refuses_is_quarantined_and_acknowledged_and_blocks_no_other(
    refusing: AsyncEngine,
    amqp_url: str,
    rabbit: RabbitTransport,
    amqp_channel: aio_pika.abc.AbstractChannel,
) -> None:
    handler, transport, subscriptions = await _archive_on(refusing, amqp_url)
    refused = encode(reservation("refuse-me").envelope)
    try:
        for n in range(20):  # the refused one in the middle of a batch
            await _publish_raw(amqp_channel, f"good-{n}", encode(reservation(f"good-{n}").envelope), {}, {})
            if n == 10:
                await _publish_raw(amqp_channel, "refused", refused, {"note": "kept"}, {"message_id": "refused-1"})
        rows = await eventually(lambda: _rows_by_case(refusing, 21), timeout=20, message="all archived or quarantined")
        await eventually(lambda: _equals(lambda: _depth(rabbit, STOCK_COMMANDS.dlq), 0), timeout=10, message="the DLQ emptied")
    finally:
        await _stop(transport, subscriptions)

    quarantined = [row for row in rows.values() if row.reason_class == QUARANTINED]
    assert len(quarantined) == 1 and len(rows) == 21
    row = quarantined[0]
    assert "'note': 'kept'" in _case(row) and f"'{CASE}': 'refused'" in _case(row)
    assert (row.message_id, row.queue, row.dlq, row.body_encoding) == (
        "refused-1",
        "stock.commands",
        "stock.commands.dlq",
        "base64",
    )
    assert base64.b64decode(row.body) == refused and "refused by the test" in row.reason
    assert handler.quarantined == 1 and handler.archived == 21 and handler.batch_splits >= 1
    # The body survives quarantine whole: replay can still send the message back.
    replayable = prepare(row, None, {q.name: q for q in t.WORK_QUEUES})
    assert not isinstance(replayable, str) and replayable.payload.order_id == "refuse-me"


async def test_an_outage_while_a_refused_batch_is_split_quarantines_nothing_good_and_acks_nothing_early(
    refusing: AsyncEngine,
    amqp_url: str,
    rabbit: RabbitTransport,
    amqp_channel: aio_pika.abc.AbstractChannel,
) -> None:
    """The database goes away while rows are stored one by one: those left wait, unacked, and are stored whole."""
    outages = 2

    class OutageWhileSplitting(DeadLetterArchive):
        async def store(self, rows: Any) -> set[str]:
            nonlocal outages
            if len(rows) == 1 and outages:
                outages -= 1
                raise ConnectionRefusedError("database down")
            return await super().store(rows)

    transport = RabbitTransport(amqp_url)
    await transport.connect()
    handler = OutageWhileSplitting(refusing, clock, max_backoff_seconds=0.05)
    subscription = await transport.consume(t.DEAD_LETTER_QUEUES[1], handler, 50)
    try:
        await _publish_raw(amqp_channel, "refused", encode(reservation("refuse-me").envelope), {}, {})
        for n in range(10):
            await _publish_raw(amqp_channel, f"good-{n}", encode(reservation(f"good-{n}").envelope), {}, {})
        rows = await eventually(lambda: _rows_by_case(refusing, 11), timeout=20, message="all archived or quarantined")
        await eventually(lambda: _equals(lambda: _depth(rabbit, STOCK_COMMANDS.dlq), 0), timeout=10, message="the DLQ emptied")
    finally:
        await subscription.stop(5)
        await transport.close()

    assert outages == 0
    assert [_case(row) for row in rows.values() if row.reason_class == QUARANTINED] == [next(k for k in rows if "'refused'" in k)]
    assert sorted(k for k in rows if k.startswith("good-")) == sorted(f"good-{n}" for n in range(10))
    assert handler.quarantined == 1 and handler.archived == 11 and handler.duplicates == 0


def _storable_row(headers: dict[str, Any], message_id: str | None, correlation_id: str | None, body: bytes) -> dict[str, Any]:
    stored = StoredMessage(body, headers, message_id, t.DLX.name, "stock.commands", correlation_id)
    delivery = MemoryDelivery(MemoryBroker(clock), t.DEAD_LETTER_QUEUES[1], stored)
    return dead_letter_row(delivery, clock.now())


_NASTY_TEXT = st.text(st.sampled_from(["a", "é", "\x00", "\ud800", "\udfff", "\U0001f600", "\\", '"', "\n"]), max_size=12)
_HEADER_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | _NASTY_TEXT | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_NASTY_TEXT, inner, max_size=3),
    max_leaves=8,
)
_HEADERS = st.dictionaries(
    st.sampled_from(
        [
            t.H_ATTEMPT,
            t.H_REASON,
            t.H_REASON_CLASS,
            t.H_SAGA_ID,
            t.H_ORIGINAL_QUEUE,
            t.H_FIRST_FAILURE,
            "x-death",
            ORIGINALS_HEADER,
        ]
    )
    | _NASTY_TEXT,
    _HEADER_VALUE,
    max_size=6,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(headers=_HEADERS, message_id=st.none() | _NASTY_TEXT, correlation_id=st.none() | _NASTY_TEXT, body=st.binary(max_size=16))
async def test_any_headers_and_properties_make_a_row_the_database_stores(
    store_engine: AsyncEngine,
    headers: dict[str, Any],
    message_id: str | None,
    correlation_id: str | None,
    body: bytes,
) -> None:
    row = _storable_row(headers, message_id, correlation_id, body)
    stored = await DeadLetterArchive(store_engine, clock).store([row])  # raises if the database refuses it
    assert stored <= {row["dedup_key"]}
    assert _raw_body(_row_view(row)) == body
    if store_engine.dialect.name == "postgresql":
        async with store_engine.connect() as connection:
            await connection.execute(text("SELECT CAST(:headers AS jsonb)"), {"headers": row["headers"]})


def _row_view(row: dict[str, Any]) -> Any:
    return type("Row", (), row)
