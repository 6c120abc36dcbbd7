"""The consumer pipeline and the in-memory broker: the same port the RabbitMQ adapter implements."""

import asyncio
import json
import uuid

import pytest
import structlog
from opentelemetry import trace
from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select
from sqlalchemy.exc import DBAPIError

from contracts import BusinessRuleError, Deferred, TransientError, encode, new_message
from contracts.messages import ReserveStock, StockLine
from infra import topology as t
from infra.clock import VirtualClock
from infra.db import create_engine
from infra.logging import add_trace_context
from infra.pipeline import MessageProcessor, RetryPolicy, failure_reason, is_transient, is_unavailable
from infra.transport.base import Delivery
from infra.transport.memory import MemoryBroker
from outbox.ports import OutgoingMessage
from outbox.relay import Relay
from outbox.tables import metadata
from outbox.uow import UnitOfWork

effects_metadata = MetaData()
effects = Table("test_effects", effects_metadata, Column("id", Integer, primary_key=True), Column("order_id", String(64)))


@pytest.fixture
async def engine(tmp_path):
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'p.db'}")
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
        await connection.run_sync(effects_metadata.create_all)
    yield engine
    await engine.dispose()


def reserve(order_id="o-1"):
    return new_message(
        ReserveStock(order_id=order_id, lines=[StockLine(sku="A", quantity=1)]), correlation_id=order_id, producer="test"
    )


def outgoing(message):
    return OutgoingMessage(
        message_id=str(message.message_id),
        type=message.type,
        correlation_id=message.correlation_id,
        exchange="compensa.commands",
        routing_key=message.type,
        body=encode(message.envelope),
    )


async def apply_effect(uow, message):
    await uow.connection.execute(insert(effects).values(order_id=message.payload.order_id))


async def count_effects(engine):
    async with engine.connect() as connection:
        return (await connection.execute(select(func.count()).select_from(effects))).scalar_one()


def processor(engine, clock, handler=apply_effect, max_attempts=3):
    return MessageProcessor(
        engine, "stock", "stock.commands", {"stock.reserve": handler}, clock, retry=RetryPolicy(max_attempts, 1.0, 8.0)
    )


async def test_duplicate_delivery_is_acknowledged_and_applied_once(engine):
    clock = VirtualClock()
    broker = MemoryBroker(clock)
    message = reserve()
    await broker.publish_batch([outgoing(message), outgoing(message)])
    consume = processor(engine, clock)
    for _ in range(2):
        await consume(broker.get("stock.commands"))
    assert await count_effects(engine) == 1
    assert consume.duplicates == 1 and broker.depth("stock.commands") == 0


async def test_unacked_delivery_returns_flagged_redelivered():
    broker = MemoryBroker(VirtualClock())
    await broker.publish_batch([outgoing(reserve())])
    first = broker.get("stock.commands")
    await first.requeue()
    again = broker.get("stock.commands")
    assert again.redelivered and again.message_id == first.message_id


async def test_transient_failure_waits_in_the_delay_queue_then_succeeds(engine):
    clock = VirtualClock()
    broker = MemoryBroker(clock)
    calls = []

    async def flaky(uow, message):
        calls.append(1)
        if len(calls) == 1:
            raise TransientError("database blinked")
        await apply_effect(uow, message)

    await broker.publish_batch([outgoing(reserve())])
    consume = processor(engine, clock, flaky)
    await consume(broker.get("stock.commands"))
    assert broker.depth("stock.commands") == 0 and broker.delayed_count() == 1
    clock.advance(0.4)  # before the jittered delay (at least half of 1 s) nothing comes back
    assert broker.release_due() == 0
    clock.advance(1.0)
    assert broker.release_due() == 1
    retried = broker.get("stock.commands")
    assert retried.attempt == 2 and retried.headers[t.H_REASON_CLASS] == "transient"
    await consume(retried)
    assert await count_effects(engine) == 1


async def test_exhausted_retries_and_permanent_errors_go_to_the_dlq_with_reasons(engine):
    clock = VirtualClock()
    broker = MemoryBroker(clock)

    async def always_transient(uow, message):
        raise TransientError("still down")

    await broker.publish_batch([outgoing(reserve("o-t"))])
    consume = processor(engine, clock, always_transient, max_attempts=2)
    await consume(broker.get("stock.commands"))
    clock.advance(10)
    broker.release_due()
    await consume(broker.get("stock.commands"))
    [dead] = broker.dead_letters("stock.commands")
    assert dead.headers[t.H_REASON_CLASS] == "transient_exhausted"
    assert dead.headers[t.H_ATTEMPT] == 2 and "still down" in dead.headers[t.H_REASON]
    assert dead.headers[t.H_SAGA_ID] == "o-t" and dead.headers[t.H_ORIGINAL_QUEUE] == "stock.commands"

    async def refuse(uow, message):
        raise BusinessRuleError("sku A is discontinued")

    await broker.publish_batch([outgoing(reserve("o-b"))])
    await processor(engine, clock, refuse)(broker.get("stock.commands"))
    business = broker.dead_letters("stock.commands")[-1]
    assert business.headers[t.H_REASON_CLASS] == "business_rule"
    assert business.headers[t.H_ATTEMPT] == 1 and await count_effects(engine) == 0


async def test_a_deferred_message_waits_as_long_as_asked_without_using_an_attempt(engine):
    clock = VirtualClock()
    broker = MemoryBroker(clock)
    refusals = []

    async def circuit_open(uow, message):
        refusals.append(clock.now())
        if len(refusals) <= 3:
            raise Deferred("gateway circuit open", retry_after_seconds=2.0)
        await apply_effect(uow, message)

    await broker.publish_batch([outgoing(reserve("o-d"))])
    # Three counted retries would dead-letter it (3 attempts); the longest delay queue waits 2 s.
    consume = processor(engine, clock, circuit_open, max_attempts=3)
    await consume(broker.get("stock.commands"))
    for _ in range(3):
        clock.advance(1.9)  # not before the 2 s it asked for
        assert broker.release_due() == 0
        clock.advance(0.7)  # jittered by at most a quarter, capped by the longest delay queue
        assert broker.release_due() == 1
        retried = broker.get("stock.commands")
        assert retried.attempt == 1, "a deferral uses no attempt"
        assert retried.headers[t.H_REASON_CLASS] == "deferred"
        assert retried.headers[t.H_DEFERRED_SINCE] == refusals[0].isoformat()
        await consume(retried)
    assert await count_effects(engine) == 1 and broker.dead_letters("stock.commands") == []


async def test_deferrals_past_the_outage_budget_count_attempts_again(engine):
    clock = VirtualClock()
    broker = MemoryBroker(clock)

    async def always_open(uow, message):
        raise Deferred("gateway circuit open", retry_after_seconds=5.0)

    consume = MessageProcessor(
        engine, "stock", "stock.commands", {"stock.reserve": always_open}, clock, retry=RetryPolicy(2, 1.0, 8.0, 10.0)
    )
    await broker.publish_batch([outgoing(reserve("o-e"))])
    deferrals = 0
    while not broker.dead_letters("stock.commands"):
        await consume(broker.get("stock.commands"))
        clock.advance(8)
        broker.release_due()
        deferrals += 1
        assert deferrals < 10, "deferred forever"
    [dead] = broker.dead_letters("stock.commands")
    # Deferred twice (8 s apart, inside the 10 s budget), then one counted retry, then the DLQ.
    assert deferrals == 4
    assert dead.headers[t.H_REASON_CLASS] == "transient_exhausted" and dead.headers[t.H_ATTEMPT] == 2


@pytest.mark.parametrize(
    ("body", "message_id", "reason"),
    [
        (b"{", "m-1", "not valid JSON"),
        (json.dumps({"hello": "world"}).encode(), "m-2", "invalid envelope"),
        (None, None, "message-id property is missing"),
        (None, "other", "!= envelope message_id"),
    ],
)
async def test_malformed_deliveries_are_dead_lettered_as_contract_errors(engine, body, message_id, reason):
    clock = VirtualClock()
    broker = MemoryBroker(clock)
    message = reserve()
    raw = outgoing(message)
    raw = OutgoingMessage(
        message_id=message_id if message_id is not None else "",
        type=raw.type,
        correlation_id=raw.correlation_id,
        exchange=raw.exchange,
        routing_key=raw.routing_key,
        body=body if body is not None else raw.body,
    )
    broker.publish_one(raw)
    delivery = broker.get("stock.commands")
    if message_id is None:
        delivery.message_id = None
    await processor(engine, clock)(delivery)
    [dead] = broker.dead_letters("stock.commands")
    assert dead.headers[t.H_REASON_CLASS] == "contract" and reason in dead.headers[t.H_REASON]
    assert await count_effects(engine) == 0


async def test_unroutable_command_fails_the_relay_batch_and_stays_pending(engine):
    clock = VirtualClock()
    broker = MemoryBroker(clock, queues=(t.SAGA_EVENTS,))
    async with UnitOfWork(engine, "saga", clock) as uow:
        uow.send(ReserveStock(order_id="o-1", lines=[StockLine(sku="A", quantity=1)]), correlation_id="o-1")
        await uow.commit()
    relay = Relay(engine, "saga", broker, clock)
    with pytest.raises(TransientError, match="unroutable"):
        await relay.relay_once()
    from outbox.uow import pending_summary

    assert (await pending_summary(engine, "saga", clock.now()))["pending"] == 1


async def test_relay_publishes_in_commit_order_per_saga(engine):
    clock = VirtualClock()
    broker = MemoryBroker(clock)
    sent = []
    for n in range(30):
        async with UnitOfWork(engine, "saga", clock) as uow:
            order_id = f"o-{n % 3}"
            message = uow.send(
                ReserveStock(order_id=order_id, lines=[StockLine(sku="A", quantity=n + 1)]),
                correlation_id=order_id,
                message_id=uuid.uuid4(),
            )
            sent.append(str(message.message_id))
            await uow.commit()
    assert await Relay(engine, "saga", broker, clock, batch_size=7).drain() == 30
    received = []
    while (delivery := broker.get("stock.commands")) is not None:
        received.append(delivery.message_id)
        await delivery.ack()
    assert received == sent


def test_infrastructure_failures_are_classified_transient_and_bugs_are_not():
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeoutError

    from infra.pipeline import is_transient

    assert is_transient(PoolTimeoutError("QueuePool limit reached"))
    assert is_transient(OperationalError("select 1", {}, Exception("database is locked")))
    assert is_transient(ConnectionResetError())
    assert is_transient(TransientError("x"))
    assert not is_transient(KeyError("bug"))
    assert not is_transient(BusinessRuleError("no"))


class _ServerStartingUp(Exception):
    """What asyncpg raises while PostgreSQL starts up: SQLSTATE 57P03, "cannot connect now"."""

    sqlstate = "57P03"


def _db_unavailable() -> DBAPIError:
    return DBAPIError("SELECT 1", None, _ServerStartingUp("the database system is starting up"))


class RestartingDatabase:
    """The database as the processor sees it during a restart: down for `probes` probes, then up."""

    def __init__(self, probes: int) -> None:
        self.down_for = probes
        self.probed = 0

    @property
    def down(self) -> bool:
        return self.probed < self.down_for

    async def probe(self) -> None:
        self.probed += 1
        if self.probed <= self.down_for:
            raise _db_unavailable()

    async def apply_effect(self, uow, message) -> None:
        """A handler: its statements fail while the database is down."""
        if self.down:
            raise _db_unavailable()
        await apply_effect(uow, message)


def waiting_processor(engine, clock, handler, database, unavailable_seconds=120.0):
    return MessageProcessor(
        engine,
        "stock",
        "stock.commands",
        {"stock.reserve": handler},
        clock,
        retry=RetryPolicy(3, 1.0, 8.0, unavailable_seconds=unavailable_seconds),
        probe=database.probe,
    )


async def test_a_restarting_database_makes_the_message_wait_not_fail(engine):
    clock = VirtualClock()
    broker = MemoryBroker(clock)
    database = RestartingDatabase(probes=3)

    await broker.publish_batch([outgoing(reserve())])
    await waiting_processor(engine, clock, database.apply_effect, database)(broker.get("stock.commands"))

    assert await count_effects(engine) == 1 and database.probed == 4
    assert broker.stats.retried == 0 and broker.dead_letters("stock.commands") == []
    assert broker.depth("stock.commands") == 0


async def test_messages_that_met_the_same_outage_all_wait_for_its_end(engine):
    clock = VirtualClock()
    broker = MemoryBroker(clock)
    database = RestartingDatabase(probes=2)

    await broker.publish_batch([outgoing(reserve(f"o-{n}")) for n in range(5)])
    consume = waiting_processor(engine, clock, database.apply_effect, database)
    await asyncio.gather(*(consume(broker.get("stock.commands")) for _ in range(5)))

    assert await count_effects(engine) == 5
    assert broker.stats.retried == 0 and broker.dead_letters("stock.commands") == []


async def test_past_its_patience_an_unavailable_database_takes_the_ordinary_retry_path(engine):
    clock = VirtualClock()
    broker = MemoryBroker(clock)
    database = RestartingDatabase(probes=1_000)

    async def down(uow, message):
        raise _db_unavailable()

    await broker.publish_batch([outgoing(reserve())])
    await waiting_processor(engine, clock, down, database, unavailable_seconds=0)(broker.get("stock.commands"))
    assert broker.stats.retried == 1 and broker.dead_letters("stock.commands") == []


async def test_a_connection_error_while_the_database_answers_is_an_ordinary_retry(engine):
    """A payment gateway's ConnectionError looks like an outage; the probe says it is not the database's."""
    clock = VirtualClock()
    broker = MemoryBroker(clock)
    database = RestartingDatabase(probes=0)

    async def gateway_down(uow, message):
        raise ConnectionRefusedError("gateway unreachable")

    await broker.publish_batch([outgoing(reserve())])
    await waiting_processor(engine, clock, gateway_down, database)(broker.get("stock.commands"))
    assert broker.stats.retried == 1 and database.probed == 1


@pytest.mark.parametrize("sqlstate", ["57P01", "57P02", "57P03", "53300", "08006", "08001"])
def test_server_not_available_now_is_transient(sqlstate):
    error = type("PgError", (Exception,), {"sqlstate": sqlstate})("down")
    assert is_unavailable(DBAPIError("SELECT 1", None, error))
    assert is_transient(DBAPIError("SELECT 1", None, error))


def test_a_bad_statement_is_not_transient_and_its_reason_shows_no_values():
    error = type("PgError", (Exception,), {"sqlstate": "22003"})("value out of range for type integer")
    exc = DBAPIError("INSERT INTO t VALUES ($1)", ("card-4111111111111111",), error)
    assert not is_transient(exc)
    reason = failure_reason(exc)
    assert "out of range" in reason and "4111" not in reason and "INSERT" not in reason


async def test_a_poison_body_in_a_batch_takes_none_of_its_neighbours_with_it(engine):
    clock = VirtualClock()
    broker = MemoryBroker(clock)
    good = [reserve(f"o-{n}") for n in range(4)]
    await broker.publish_batch([outgoing(m) for m in good[:2]])
    broker.publish_one(
        OutgoingMessage(
            message_id="poison",
            type="stock.reserve",
            correlation_id="x",
            exchange="compensa.commands",
            routing_key="stock.reserve",
            body=b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
        )
    )
    await broker.publish_batch([outgoing(m) for m in good[2:]])
    consume = processor(engine, clock)
    await consume.process_batch([broker.get("stock.commands") for _ in range(5)])

    assert await count_effects(engine) == 4
    [dead] = broker.dead_letters("stock.commands")
    assert dead.headers[t.H_REASON_CLASS] == "contract" and "nested too deeply" in dead.headers[t.H_REASON]
    assert broker.depth("stock.commands") == 0 and not broker.unacked


class _AckLost(Delivery):
    """A delivery whose channel dropped after the commit: the ack fails."""

    def __init__(self, inner: Delivery) -> None:
        self.inner = inner
        for name in ("queue", "body", "headers", "message_id", "correlation_id", "exchange", "routing_key", "redelivered"):
            setattr(self, name, getattr(inner, name))

    async def ack(self) -> None:
        raise TransientError("ack failed: channel closed")

    async def retry(self, delay_ms, expiration_ms, headers) -> None:
        await self.inner.retry(delay_ms, expiration_ms, headers)

    async def dead_letter(self, headers) -> None:
        await self.inner.dead_letter(headers)


async def test_an_ack_lost_after_commit_is_no_failure_and_the_redelivery_is_skipped(engine):
    clock = VirtualClock()
    broker = MemoryBroker(clock)
    await broker.publish_batch([outgoing(reserve())])
    consume = processor(engine, clock)
    first = broker.get("stock.commands")
    await consume(_AckLost(first))
    assert broker.dead_letters("stock.commands") == [] and broker.stats.retried == 0

    await first.requeue()  # what the broker does with an unacked delivery
    await consume(broker.get("stock.commands"))
    assert await count_effects(engine) == 1 and consume.duplicates == 1


class _DeadLetterRefused(_AckLost):
    """A delivery whose dead letter the broker refuses (its DLQ is gone): it cannot be settled."""

    async def ack(self) -> None:
        await self.inner.ack()

    async def dead_letter(self, headers) -> None:
        raise TransientError("DLQ publish not confirmed")


async def test_a_delivery_that_cannot_be_settled_leaves_none_of_its_batch_unprocessed(engine):
    clock = VirtualClock()
    broker = MemoryBroker(clock)
    good = [reserve(f"o-{n}") for n in range(3)]
    await broker.publish_batch([outgoing(good[0])])
    broker.publish_one(
        OutgoingMessage(
            message_id="poison",
            type="stock.reserve",
            correlation_id="x",
            exchange="compensa.commands",
            routing_key="stock.reserve",
            body=b"{not json",
        )
    )
    await broker.publish_batch([outgoing(m) for m in good[1:]])
    first, poison, *rest = [broker.get("stock.commands") for _ in range(4)]
    consume = processor(engine, clock)

    with pytest.raises(TransientError, match="DLQ publish not confirmed"):
        await consume.process_batch([first, _DeadLetterRefused(poison), *rest])

    assert await count_effects(engine) == 3
    assert [d.settled for d in (first, *rest)] == [True, True, True] and not poison.settled


async def test_what_became_of_a_failed_message_is_logged_in_its_trace(engine, spans):
    clock = VirtualClock()
    broker = MemoryBroker(clock)
    with trace.get_tracer("test").start_as_current_span("producer") as producer:
        context = producer.get_span_context()
        producer_trace = format(context.trace_id, "032x")
        sent = new_message(
            ReserveStock(order_id="o-traced", lines=[StockLine(sku="A", quantity=1)]),
            correlation_id="o-traced",
            producer="test",
            traceparent=f"00-{producer_trace}-{format(context.span_id, '016x')}-01",
        )

    async def refuse_for_now(uow, message):
        raise TransientError("database blinked")

    await broker.publish_batch([outgoing(sent)])
    # Undecodable, its trace only in the AMQP headers (a raw publisher's traceparent).
    garbage = outgoing(reserve("o-garbage"))
    broker.publish_one(
        OutgoingMessage(
            message_id=garbage.message_id,
            type=garbage.type,
            correlation_id=garbage.correlation_id,
            exchange=garbage.exchange,
            routing_key=garbage.routing_key,
            body=b"{",
            headers={"traceparent": f"00-{'ab' * 16}-{'cd' * 8}-01"},
        )
    )
    spans.clear()
    with structlog.testing.capture_logs(processors=[add_trace_context]) as lines:
        consume = processor(engine, clock, refuse_for_now)
        await consume(broker.get("stock.commands"))
        await consume(broker.get("stock.commands"))

    by_event = {line["event"]: line for line in lines}
    assert by_event["message.retry_scheduled"]["trace_id"] == producer_trace
    assert by_event["message.dead_lettered"]["trace_id"] == "ab" * 16
    finished = {span.name: span for span in spans.get_finished_spans()}
    process = finished["stock.commands process stock.reserve"]
    assert process.parent is not None and process.parent.span_id == producer.get_span_context().span_id
    # What became of it hangs under the attempt that failed, in the producer's trace.
    retried = finished["stock.commands settle stock.reserve"]
    assert retried.parent is not None and retried.parent.span_id == process.context.span_id
    assert retried.attributes["messaging.operation.type"] == "settle"
    assert by_event["message.retry_scheduled"]["span_id"] == format(retried.context.span_id, "016x")
    undecodable = finished["stock.commands settle undecodable"]
    assert undecodable.parent is not None and format(undecodable.parent.span_id, "016x") == "cd" * 8
