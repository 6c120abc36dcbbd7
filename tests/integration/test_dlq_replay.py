"""Replaying dead letters on the real RabbitMQ and PostgreSQL, through the `compensa dlq` CLI.

After the handler is fixed, a replay applies each message once; replaying again
changes nothing; a dry run writes nothing; an edit that breaks the contract is
refused; a replay committed while no relay runs is delivered once one starts; a
replayed event reaches only the queue it failed on; purge marks only what its
filter names.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest
from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts import Message, PaymentAuthorized, ReserveStock, StockLine, encode, new_message
from contracts.routing import COMMANDS_EXCHANGE
from infra import topology as t
from infra.clock import SystemClock
from infra.dlq.archive import DeadLetterArchive, start_archive
from infra.dlq.tables import dead_letters
from infra.pipeline import MessageProcessor, RetryPolicy
from infra.topology import STOCK_COMMANDS
from infra.transport.rabbit import RabbitTransport
from outbox.ports import OutgoingMessage
from outbox.relay import Relay
from outbox.tables import tables_for
from outbox.uow import UnitOfWork
from tests.integration.support import applied_rows, archived, effects, publish_dead_letter, purge, record_reservation, stack_env
from tests.support import assert_one_line_error, compensa, eventually

pytestmark = pytest.mark.integration

clock = SystemClock()


@pytest.fixture(autouse=True)
async def empty(engine: AsyncEngine, rabbit: RabbitTransport) -> None:
    async with engine.begin() as connection:
        for table in (dead_letters, effects, tables_for("stock").inbox, tables_for("ledger").inbox, tables_for("dlq").outbox):
            await connection.execute(delete(table))
    await purge(rabbit.connection, *(q.dlq for q in t.WORK_QUEUES), t.LEDGER_EVENTS.name, t.SAGA_EVENTS.name)


class Participant:
    """A stock.commands consumer whose handler is broken until the test fixes it."""

    def __init__(self) -> None:
        self.broken = True

    async def reserve(self, uow: UnitOfWork, message: Message[ReserveStock]) -> None:
        if self.broken:
            raise RuntimeError(f"bug: cannot reserve {message.payload.order_id}")
        await record_reservation(uow, message)


@pytest.fixture
async def participant(engine: AsyncEngine, consume: Any, retry_policy: RetryPolicy) -> Participant:
    participant = Participant()
    await consume(
        MessageProcessor(engine, "stock", STOCK_COMMANDS.name, {"stock.reserve": participant.reserve}, clock, retry=retry_policy)
    )
    return participant


@pytest.fixture
async def archive(engine: AsyncEngine, amqp_url: str) -> AsyncIterator[DeadLetterArchive]:
    transport = RabbitTransport(amqp_url)
    await transport.connect()
    handler, subscriptions = await start_archive(transport, engine, clock, prefetch=20)
    try:
        yield handler
    finally:
        for subscription in subscriptions:
            await subscription.stop(grace_seconds=5)
        await transport.close()


@pytest.fixture
def relay(engine: AsyncEngine, rabbit: RabbitTransport) -> Relay:
    """The dlq outbox's relay; tests drain it when they want delivery to happen."""
    return Relay(engine, "dlq", rabbit, clock)


@pytest.fixture
def env(engine: AsyncEngine, amqp_url: str) -> dict[str, str]:
    return stack_env(engine, amqp_url)


def reservation(order_id: str, quantity: int = 1) -> Message[ReserveStock]:
    return new_message(
        ReserveStock(order_id=order_id, lines=(StockLine(sku="sku-1", quantity=quantity),)),
        correlation_id=order_id,
        producer="saga",
    )


async def send(rabbit: RabbitTransport, *messages: Message[Any]) -> None:
    """Publish as the saga's relay does: to compensa.commands, confirmed."""
    await rabbit.publish_batch(
        [
            OutgoingMessage(str(m.message_id), m.type, m.correlation_id, COMMANDS_EXCHANGE, m.type, encode(m.envelope))
            for m in messages
        ]
    )


async def applied(engine: AsyncEngine) -> list[tuple[str, int]]:
    """(order id, quantity) of each applied reservation, in order."""
    return [(row.order_id, row.quantity) for row in await applied_rows(engine)]


async def outbox_count(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        return (await connection.execute(select(func.count()).select_from(tables_for("dlq").outbox))).scalar_one()


async def dead_lettered(engine: AsyncEngine, rabbit: RabbitTransport, *messages: Message[Any]) -> list[Any]:
    """Send the messages to the broken participant; return their archived dead letters."""
    await send(rabbit, *messages)
    ids = {str(m.message_id) for m in messages}

    async def all_archived() -> list[Any]:
        rows = [r for r in await archived(engine) if r.message_id in ids]
        return rows if len(rows) == len(ids) else []

    return await eventually(all_archived, timeout=15, message="dead letters archived")


async def test_after_the_fix_replay_applies_each_once_and_replaying_again_changes_nothing(
    engine: AsyncEngine,
    rabbit: RabbitTransport,
    participant: Participant,
    archive: DeadLetterArchive,
    relay: Relay,
    env: dict[str, str],
) -> None:
    messages = [reservation(f"fix-{n}", quantity=n + 1) for n in range(3)]
    rows = await dead_lettered(engine, rabbit, *messages)
    assert {r.reason for r in rows} == {f"RuntimeError: bug: cannot reserve fix-{n}" for n in range(3)}
    assert {r.reason_class for r in rows} == {"handler_error"}
    participant.broken = False

    first = await compensa(env, "dlq", "replay", "--queue", "stock.commands", "--reason-class", "handler_error", "--json")
    assert first.returncode == 0, first.stderr
    assert (first.json()["replayed"], first.json()["skipped"], first.json()["refused"]) == (3, 0, 0)
    await relay.drain()
    await eventually(lambda: _count_is(applied(engine), 3), timeout=10)

    again = await compensa(env, "dlq", "replay", *(str(r.id) for r in rows), "--json")
    assert again.returncode == 0, again.stderr
    summary = again.json()
    assert (summary["replayed"], summary["skipped"], summary["refused"]) == (0, 3, 0)
    assert all(o["detail"].startswith("already replayed at") for o in summary["outcomes"])
    assert await relay.drain() == 0
    assert sorted(await applied(engine)) == [("fix-0", 1), ("fix-1", 2), ("fix-2", 3)]
    assert {(r.status, r.replay_count) for r in await archived(engine)} == {("replayed", 1)}
    listed = await compensa(env, "dlq", "list", "--status", "replayed", "--json")
    assert listed.json()["total"] == 3


async def _count_is(rows: Any, count: int) -> bool:
    return len(await rows) == count


async def test_a_dry_run_changes_nothing(
    engine: AsyncEngine,
    rabbit: RabbitTransport,
    participant: Participant,
    archive: DeadLetterArchive,
    env: dict[str, str],
) -> None:
    rows = await dead_lettered(engine, rabbit, reservation("dry-1"), reservation("dry-2"))
    before = await archived(engine)

    run = await compensa(env, "dlq", "replay", "--all", "--dry-run")
    assert run.returncode == 0, run.stderr
    assert "would replay 2, skipped 0, refused 0 — dry run, nothing written" in run.stdout
    as_json = (await compensa(env, "dlq", "replay", *(str(r.id) for r in rows), "--dry-run", "--json")).json()
    assert as_json["dry_run"] and [o["action"] for o in as_json["outcomes"]] == ["would_replay", "would_replay"]

    assert await archived(engine) == before
    assert await outbox_count(engine) == 0


async def test_an_edit_that_breaks_the_contract_is_refused_and_a_valid_edit_is_applied(
    engine: AsyncEngine,
    rabbit: RabbitTransport,
    participant: Participant,
    archive: DeadLetterArchive,
    relay: Relay,
    env: dict[str, str],
) -> None:
    [row] = await dead_lettered(engine, rabbit, reservation("edit-1", quantity=5))
    participant.broken = False

    refused = await compensa(env, "dlq", "replay", str(row.id), "--edit", '{"lines": [{"sku": "sku-1", "quantity": 0}]}')
    assert refused.returncode == 1
    assert "refused 1" in refused.stdout and "lines.0.quantity: Input should be greater than 0" in refused.stdout
    assert (await archived(engine))[0].status == "new" and await outbox_count(engine) == 0

    fixed = await compensa(env, "dlq", "replay", str(row.id), "--edit", '{"lines": [{"sku": "sku-1", "quantity": 2}]}', "--json")
    assert fixed.returncode == 0, fixed.stderr
    assert fixed.json()["outcomes"][0]["payload"] == {"order_id": "edit-1", "lines": [{"sku": "sku-1", "quantity": 2}]}
    await relay.drain()
    await eventually(lambda: _count_is(applied(engine), 1), timeout=10)
    assert await applied(engine) == [("edit-1", 2)]
    [after] = await archived(engine)
    assert json.loads(after.replay_patch) == {"lines": [{"quantity": 2, "sku": "sku-1"}]}


async def test_a_replay_committed_while_no_relay_runs_is_delivered_once_one_starts(
    engine: AsyncEngine,
    rabbit: RabbitTransport,
    participant: Participant,
    archive: DeadLetterArchive,
    env: dict[str, str],
) -> None:
    rows = await dead_lettered(engine, rabbit, *(reservation(f"late-{n}") for n in range(5)))
    participant.broken = False

    run = await compensa(env, "dlq", "replay", "--saga", "late-3")
    assert run.returncode == 0 and "replayed 1, skipped 0, refused 0" in run.stdout
    run = await compensa(env, "dlq", "replay", "--all", "--json")
    assert run.json()["replayed"] == 4
    # The operator's process is gone; the rows wait in the outbox, the dead letters say replayed.
    assert await outbox_count(engine) == 5 and await applied(engine) == []
    assert {r.status for r in await archived(engine)} == {"replayed"}

    stop = asyncio.Event()
    relay_task = asyncio.create_task(Relay(engine, "dlq", rabbit, clock, poll_seconds=0.05).run(stop))
    try:
        await eventually(lambda: _count_is(applied(engine), 5), timeout=15)
    finally:
        stop.set()
        await relay_task
    assert sorted(o for o, _ in await applied(engine)) == [f"late-{n}" for n in range(5)]
    assert len(rows) == 5


async def test_a_replayed_event_goes_to_the_queue_it_failed_on_only(
    engine: AsyncEngine,
    rabbit: RabbitTransport,
    amqp_channel: aio_pika.abc.AbstractChannel,
    archive: DeadLetterArchive,
    relay: Relay,
    depth: Any,
    env: dict[str, str],
) -> None:
    event = new_message(
        PaymentAuthorized(order_id="fan-1", payment_id="pay-1", amount={"amount": 500, "currency": "EUR"}),
        correlation_id="fan-1",
        producer="payments",
    )
    await publish_dead_letter(amqp_channel, t.LEDGER_EVENTS, event)
    await eventually(lambda: archive.archived == 1, timeout=10)

    run = await compensa(env, "dlq", "replay", "--queue", "ledger.events", "--type", "payment.authorized")
    assert run.returncode == 0, run.stderr
    assert await relay.drain() == 1

    await eventually(lambda: _equals(depth("ledger.events"), 1), timeout=10)
    assert await depth("saga.events") == 0  # subscribed to payment.authorized, not re-sent it
    queue = await amqp_channel.get_queue("ledger.events")
    delivered = await queue.get(timeout=5)
    assert delivered.message_id == str(event.message_id) and delivered.exchange == ""
    assert json.loads(delivered.body)["payload"]["payment_id"] == "pay-1"
    await delivered.ack()


async def _equals(value: Any, expected: int) -> bool:
    return await value == expected


async def test_a_message_the_consumer_already_applied_is_skipped_by_its_inbox(
    engine: AsyncEngine,
    rabbit: RabbitTransport,
    amqp_channel: aio_pika.abc.AbstractChannel,
    participant: Participant,
    archive: DeadLetterArchive,
    relay: Relay,
    env: dict[str, str],
) -> None:
    participant.broken = False
    message = reservation("twice-1")
    await send(rabbit, message)
    await eventually(lambda: _count_is(applied(engine), 1), timeout=10)
    # A copy of the same message dead-lettered elsewhere (e.g. a duplicate that exhausted its retries).
    await publish_dead_letter(amqp_channel, STOCK_COMMANDS, message, reason_class="transient_exhausted")
    await eventually(lambda: archive.archived == 1, timeout=10)

    run = await compensa(env, "dlq", "replay", "--saga", "twice-1", "--json")
    assert run.json()["replayed"] == 1
    assert await relay.drain() == 1
    await eventually(lambda: _inbox_skipped(engine, str(message.message_id)), timeout=10)
    assert await applied(engine) == [("twice-1", 1)]


async def _inbox_skipped(engine: AsyncEngine, message_id: str) -> bool:
    async with engine.connect() as connection:
        inbox = tables_for("stock").inbox
        seen = (
            await connection.execute(select(func.count()).select_from(inbox).where(inbox.c.message_id == message_id))
        ).scalar_one()
    return seen == 1


async def test_a_message_that_fails_again_after_replay_is_archived_again_and_can_be_replayed_again(
    engine: AsyncEngine,
    rabbit: RabbitTransport,
    participant: Participant,
    archive: DeadLetterArchive,
    relay: Relay,
    env: dict[str, str],
) -> None:
    [first] = await dead_lettered(engine, rabbit, reservation("again-1"))
    assert (await compensa(env, "dlq", "replay", str(first.id))).returncode == 0
    await relay.drain()  # still broken: it fails again and comes back as a second dead letter
    rows = await eventually(lambda: _rows_when(engine, 2), timeout=10)
    assert [r.status for r in rows] == ["replayed", "new"]
    assert rows[1].original_exchange == "" and rows[1].queue == "stock.commands"

    participant.broken = False
    assert (await compensa(env, "dlq", "replay", str(rows[1].id))).returncode == 0
    await relay.drain()
    await eventually(lambda: _count_is(applied(engine), 1), timeout=10)


async def _rows_when(engine: AsyncEngine, count: int) -> list[Any]:
    rows = await archived(engine)
    return rows if len(rows) == count else []


async def test_purge_marks_only_what_its_filter_names(
    engine: AsyncEngine,
    rabbit: RabbitTransport,
    amqp_channel: aio_pika.abc.AbstractChannel,
    archive: DeadLetterArchive,
    env: dict[str, str],
) -> None:
    for n in range(3):
        await publish_dead_letter(
            amqp_channel, STOCK_COMMANDS, reservation(f"purge-{n}"), reason_class="contract" if n else "handler_error"
        )
    await publish_dead_letter(amqp_channel, t.PAYMENTS_COMMANDS, reservation("purge-pay"), reason_class="contract")
    await eventually(lambda: archive.archived == 4, timeout=10)

    refused = await compensa(env, "dlq", "purge", "--reason-class", "contract")
    assert_one_line_error(refused, "would purge 3 dead letters", "--yes")
    run = await compensa(env, "dlq", "purge", "--queue", "stock.commands", "--reason-class", "contract", "--yes")
    assert run.returncode == 0, run.stderr
    assert "purged 2 dead letters" in run.stdout

    statuses = {r.saga_id: r.status for r in await archived(engine)}
    assert statuses == {"purge-0": "new", "purge-1": "purged", "purge-2": "purged", "purge-pay": "new"}
    assert all(r.purged_at is not None for r in await archived(engine) if r.status == "purged")
    # Purged ones are archived, not deleted, and a replay skips them.
    replay = (await compensa(env, "dlq", "replay", "--status", "purged", "--json")).json()
    assert (replay["replayed"], replay["skipped"]) == (0, 2)
    assert (await compensa(env, "dlq", "list", "--status", "new", "--json")).json()["total"] == 2


async def test_prune_deletes_only_dead_letters_dealt_with_before_the_cutoff(
    engine: AsyncEngine,
    rabbit: RabbitTransport,
    amqp_channel: aio_pika.abc.AbstractChannel,
    archive: DeadLetterArchive,
    env: dict[str, str],
) -> None:
    from datetime import timedelta

    from sqlalchemy import update

    from infra.dlq.tables import dead_letters

    for name in ("old-replayed", "old-purged", "new-purged", "old-new"):
        await publish_dead_letter(amqp_channel, STOCK_COMMANDS, reservation(name), reason_class="contract")
    await eventually(lambda: archive.archived == 4, timeout=10)
    long_ago = SystemClock().now() - timedelta(days=40)
    async with engine.begin() as connection:
        dl = dead_letters
        await connection.execute(update(dl).where(dl.c.saga_id == "old-replayed").values(status="replayed", replayed_at=long_ago))
        await connection.execute(update(dl).where(dl.c.saga_id == "old-purged").values(status="purged", purged_at=long_ago))
        await connection.execute(
            update(dl).where(dl.c.saga_id == "new-purged").values(status="purged", purged_at=SystemClock().now())
        )
        # Never dealt with, however old: stays.
        await connection.execute(update(dl).where(dl.c.saga_id == "old-new").values(archived_at=long_ago))

    assert_one_line_error(await compensa(env, "dlq", "prune", "--older-than", "30d"), "confirm with --yes")
    assert_one_line_error(await compensa(env, "dlq", "prune", "--older-than", "soon", "--yes"), "--older-than", "bad duration")
    run = await compensa(env, "dlq", "prune", "--older-than", "30d", "--yes", "--json")
    assert run.returncode == 0, run.stderr
    assert run.json()["deleted"] == {"replayed": 1, "purged": 1}
    assert sorted(r.saga_id for r in await archived(engine)) == ["new-purged", "old-new"]
