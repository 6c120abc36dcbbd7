"""Run the simulator's seeded workload on the real stack: PostgreSQL, RabbitMQ, real time.

The same orders as `compensa simulate` draws for a seed go through an in-process
Runtime (every service, the relays, the deadline sweeper) with short saga deadlines.
The faults a real deployment can suffer are injected around it: declines (part of
the workload), duplicate publishes and relay crashes after the broker confirmed (a
wrapper round the relays' publisher) and transient participant errors (a wrapper round
the stock and payments handlers), both from faults.py and handed to `bootstrap()`, the
simulator's injector and wrappers. When every saga is terminal and nothing is left in
flight, the runtime stops gracefully and the simulator's invariants are checked over
the services' tables, the work queues (passive declares) and the dead-letter queues.

Runs need a database of their own: the invariants look at every row.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import structlog
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

import consumers.stock as stock
from consumers.orders.tables import orders_orders
from contracts import CompensaError
from infra import topology as t
from infra.bootstrap import MESSAGE_SERVICES, OUTBOX_SERVICES, bootstrap
from infra.clock import SystemClock
from infra.db import create_engine
from infra.runtime import Runtime
from infra.schema import upgrade
from infra.settings import Settings
from infra.simulation.driver import SimulationOptions, SimulationResult
from infra.simulation.faults import FaultInjector
from infra.simulation.readback import Observed, dead_letter_record, read_back
from infra.simulation.scenario import place_planned_order
from infra.topology import QueueSpec, retry_delays_ms
from infra.transport.base import Delivery, DeliveryHandler, Subscription
from infra.transport.rabbit import RabbitTransport
from outbox.ports import OutgoingMessage
from outbox.tables import tables_for
from sagas.simulation.faults import RATE_NAMES, FaultRates
from sagas.simulation.invariants import TERMINAL_STATUSES
from sagas.simulation.workload import Workload, WorkloadSpec, generate
from sagas.tables import saga_instances

log = structlog.get_logger("compensa.realstack")

#: The faults the real stack can suffer on purpose; the others need the simulator's broker.
REAL_FAULTS = ("duplicate", "relay_crash", "transient_error")
#: Most dead letters read back from one queue for the report.
DEAD_LETTER_PEEK_LIMIT = 1000


class RealStackError(CompensaError):
    """The servers are not in a state a run can start from."""


def real_stack_faults(rates: FaultRates) -> tuple[FaultRates, list[str]]:
    """Keep the rates the real stack can inject; name the ones set but left out."""
    ignored = [name for name in RATE_NAMES if name not in REAL_FAULTS and getattr(rates, name) > 0]
    kept = replace(FaultRates(), **{name: getattr(rates, name) for name in REAL_FAULTS})
    return kept, ignored


@dataclass
class Traffic:
    """What went through the broker during the run, as the runtime saw it."""

    published: int = 0
    delivered: int = 0
    redelivered: int = 0
    acked: int = 0
    retried: int = 0
    dead_lettered: int = 0
    in_flight: int = 0
    published_ids: set[str] = field(default_factory=set)
    unrouted_ids: set[str] = field(default_factory=set)


_BOUND = {(q.exchange.name, key) for q in t.WORK_QUEUES for key in q.routing_keys}


class CountedDelivery(Delivery):
    """A delivery whose settlement is counted in the run's traffic on the way through."""

    def __init__(self, inner: Delivery, traffic: Traffic) -> None:
        self._inner = inner
        self._traffic = traffic
        self.queue = inner.queue
        self.body = inner.body
        self.headers = inner.headers
        self.message_id = inner.message_id
        self.correlation_id = inner.correlation_id
        self.exchange = inner.exchange
        self.routing_key = inner.routing_key
        self.redelivered = inner.redelivered

    async def ack(self) -> None:
        self._traffic.acked += 1
        await self._inner.ack()

    # A retry or a dead letter acknowledges the delivery once its copy is confirmed.
    async def retry(self, delay_ms: int, expiration_ms: int, headers: Mapping[str, Any]) -> None:
        self._traffic.retried += 1
        await self._inner.retry(delay_ms, expiration_ms, headers)
        self._traffic.acked += 1

    async def dead_letter(self, headers: Mapping[str, Any]) -> None:
        self._traffic.dead_lettered += 1
        await self._inner.dead_letter(headers)
        self._traffic.acked += 1


class CountingTransport:
    """The runtime's RabbitMQ transport, counting the traffic it carries.

    The faults are not here: they are wired into the services by `bootstrap`
    (infra/simulation/faults.py), so the publishes counted include injected duplicates.
    """

    def __init__(self, inner: RabbitTransport) -> None:
        self.inner = inner
        self.traffic = Traffic()

    async def declare_topology(self) -> None:
        await self.inner.declare_topology()

    async def close(self) -> None:
        await self.inner.close()

    async def publish_batch(self, messages: Sequence[OutgoingMessage]) -> None:
        await self.inner.publish_batch(messages)
        self.traffic.published += len(messages)
        for message in messages:
            self.traffic.published_ids.add(message.message_id)
            if (message.exchange, message.routing_key) not in _BOUND:
                self.traffic.unrouted_ids.add(message.message_id)

    async def consume(self, queue: QueueSpec, handler: DeliveryHandler, prefetch: int) -> Subscription:
        traffic = self.traffic

        async def counted(delivery: Delivery) -> None:
            traffic.delivered += 1
            traffic.redelivered += bool(delivery.redelivered)
            traffic.in_flight += 1
            try:
                await handler(CountedDelivery(delivery, traffic))
            finally:
                traffic.in_flight -= 1

        return await self.inner.consume(queue, counted, prefetch)


#: Timings short enough for a run that takes seconds (the deadlines are a run option).
REAL_STACK_TIMINGS: dict[str, Any] = {
    "deadline_sweep_seconds": 0.2,
    "relay_poll_seconds": 0.1,
    "max_attempts": 5,
    "retry_base_seconds": 0.1,
    "retry_max_seconds": 1.0,
    "shutdown_grace_seconds": 10.0,
}
RETRY_DELAYS_MS = retry_delays_ms(
    REAL_STACK_TIMINGS["max_attempts"], REAL_STACK_TIMINGS["retry_base_seconds"], REAL_STACK_TIMINGS["retry_max_seconds"]
)
#: Every queue a message of the run may wait in: work queues and their delay queues.
RUN_QUEUES = [q.name for q in t.WORK_QUEUES] + [q.delay_queue(ms) for q in t.WORK_QUEUES for ms in RETRY_DELAYS_MS]


def real_stack_settings(database_url: str, amqp_url: str, saga_deadline_seconds: float) -> Settings:
    """Production settings (COMPENSA_* still apply) with the run's short timings."""
    return Settings(
        database_url=database_url,
        amqp_url=amqp_url,
        saga_step_deadline_seconds=saga_deadline_seconds,
        saga_compensation_deadline_seconds=saga_deadline_seconds,
        **REAL_STACK_TIMINGS,
    )


def real_stack_transport(amqp_url: str, queue_type: str = "classic") -> RabbitTransport:
    """A RabbitMQ transport whose delay queues match the run's retry timings."""
    return RabbitTransport(amqp_url, queue_type=queue_type, retry_delays_ms=RETRY_DELAYS_MS)


async def _queue_state(transport: RabbitTransport, names: Sequence[str]) -> dict[str, tuple[int, int]]:
    """Ready messages and consumers per queue, from passive declares."""
    channel = await transport.connection.channel()
    try:
        state: dict[str, tuple[int, int]] = {}
        for name in names:
            declared = (await channel.declare_queue(name, passive=True)).declaration_result
            assert declared.message_count is not None and declared.consumer_count is not None, "Declare-Ok carries both counts"
            state[name] = (declared.message_count, declared.consumer_count)
        return state
    finally:
        await channel.close()


async def _require_fresh(engine: AsyncEngine, transport: RabbitTransport) -> None:
    async with engine.connect() as connection:
        placed = (await connection.execute(select(func.count()).select_from(orders_orders))).scalar_one()
        sagas = (await connection.execute(select(func.count()).select_from(saga_instances))).scalar_one()
    if placed or sagas:
        raise RealStackError(
            f"the database already holds {placed} orders and {sagas} sagas; "
            "a real-stack run checks every row, so give it an empty database"
        )
    busy = {name: state for name, state in (await _queue_state(transport, RUN_QUEUES)).items() if state != (0, 0)}
    if busy:
        detail = ", ".join(f"{name} ({ready} ready, {consumers} consumers)" for name, (ready, consumers) in sorted(busy.items()))
        raise RealStackError(f"queues are in use: {detail}; stop other compensa services and drain the queues first")


async def _place_orders(engine: AsyncEngine, workload: Workload, arrival_scale: float) -> None:
    """Place every order in arrival order, at its arrival time scaled by `arrival_scale`."""
    clock = SystemClock()
    loop = asyncio.get_running_loop()
    origin = loop.time()
    for planned in workload.orders:
        wait = origin + planned.at_seconds * arrival_scale - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        await place_planned_order(engine, clock, planned, workload)


async def _terminal_count(engine: AsyncEngine, order_ids: Sequence[str]) -> int:
    async with engine.connect() as connection:
        return int(
            (
                await connection.execute(
                    select(func.count())
                    .select_from(saga_instances)
                    .where(saga_instances.c.saga_id.in_(order_ids), saga_instances.c.status.in_(sorted(TERMINAL_STATUSES)))
                )
            ).scalar_one()
        )


async def _pending_outbox(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        total = 0
        for service in OUTBOX_SERVICES:
            outbox = tables_for(service).outbox
            total += int(
                (
                    await connection.execute(select(func.count()).select_from(outbox).where(outbox.c.sent_at.is_(None)))
                ).scalar_one()
            )
    return total


async def _wait_until_quiet(
    engine: AsyncEngine,
    counting: CountingTransport,
    order_ids: Sequence[str],
    deadline: float,
    on_progress: Callable[[int, int], None] | None,
) -> bool:
    """Poll until every saga is terminal and nothing is in flight, twice in a row."""
    loop = asyncio.get_running_loop()
    quiet_before: int | None = None
    while loop.time() < deadline:
        terminal = await _terminal_count(engine, order_ids)
        if on_progress is not None:
            on_progress(terminal, len(order_ids))
        quiet = (
            terminal == len(order_ids)
            and counting.traffic.in_flight == 0
            and await _pending_outbox(engine) == 0
            and all(ready == 0 for ready, _ in (await _queue_state(counting.inner, RUN_QUEUES)).values())
        )
        if quiet:
            # Quiet twice, with no delivery in between: nothing was merely between hops.
            if quiet_before == counting.traffic.delivered:
                return True
            quiet_before = counting.traffic.delivered
        else:
            quiet_before = None
        await asyncio.sleep(0.2)
    return False


async def _dead_letters(transport: RabbitTransport, ours: set[str]) -> list[dict[str, str]]:
    """Read every DLQ without consuming it; keep the run's own messages."""
    found = []
    channel = await transport.connection.channel()
    try:
        for spec in t.WORK_QUEUES:
            queue = await channel.declare_queue(spec.dlq, passive=True)
            for _ in range(DEAD_LETTER_PEEK_LIMIT):
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                if message.message_id in ours:
                    found.append((message.message_id, dead_letter_record(spec.name, message.body, dict(message.headers or {}))))
    finally:
        # Closing the channel returns every peeked message to its queue, unharmed.
        await channel.close()
    return [record | {"message_id": message_id} for message_id, record in found]


async def run_real_stack(
    seed: int,
    spec: WorkloadSpec,
    *,
    amqp_url: str,
    database_url: str,
    faults: FaultRates | None = None,
    timeout: float = 120,
    arrival_scale: float = 0.05,
    saga_deadline_seconds: float = 5.0,
    on_progress: Callable[[int, int], None] | None = None,
) -> SimulationResult:
    """Run the seed's workload through the real services and check every invariant.

    Only the faults in REAL_FAULTS are injected; `real_stack_faults` says which others
    were asked for. Inter-arrival times shrink by `arrival_scale`. A run that is not
    quiet after `timeout` seconds is stopped and reported with what it reached.
    """
    started = time.perf_counter()
    rates, _ignored = real_stack_faults(faults or FaultRates())
    rng = random.Random(seed)
    workload = generate(spec, rng)
    settings = real_stack_settings(database_url, amqp_url, saga_deadline_seconds)
    order_ids = [planned.order_id for planned in workload.orders]
    engine = create_engine(database_url)
    inner = real_stack_transport(amqp_url, settings.queue_type)
    counting = CountingTransport(inner)
    # Duplicates at publish time: a real broker cannot be told to redeliver.
    injector = FaultInjector(rates, rng, duplicate_publishes=True)
    registry = bootstrap(settings, wrap_handlers=injector.wrap_handlers, wrap_publisher=injector.publisher)
    runtime: Runtime | None = None
    try:
        await upgrade(engine)
        await inner.declare_topology()
        await _require_fresh(engine, inner)
        await stock.seed_stock(engine, workload.stock)
        runtime = Runtime(engine, counting, SystemClock(), settings, MESSAGE_SERVICES, registry=registry)
        await runtime.start()
        first_order = time.perf_counter()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await _place_orders(engine, workload, arrival_scale)
        quiet = await _wait_until_quiet(engine, counting, order_ids, deadline, on_progress)
        run_seconds = time.perf_counter() - first_order
        await runtime.stop()
        processors = runtime.processors
        runtime = None
        if not quiet:
            log.warning("realstack.timed_out", timeout=timeout)
        left = {name: ready for name, (ready, _) in (await _queue_state(inner, RUN_QUEUES)).items() if ready}
        dead_letters = await _dead_letters(inner, counting.traffic.published_ids)
        observed = Observed(
            published_ids=counting.traffic.published_ids,
            dead_lettered={record["message_id"]: record["reason"] for record in dead_letters},
            unrouted_ids=counting.traffic.unrouted_ids,
            messages_left=sum(left.values()),
        )
        # Consumed: what the services' inboxes hold (consumed_ids left unset).
        found = await read_back(engine, workload, observed)
    finally:
        if runtime is not None:
            await runtime.stop()
        await inner.close()
        await engine.dispose()
    traffic = counting.traffic
    counters = {
        "published": traffic.published,
        "delivered": traffic.delivered,
        "acked": traffic.acked,
        "requeued": traffic.redelivered,
        "retried": traffic.retried,
        "dead_lettered": traffic.dead_lettered,
        "unrouted_events": len(traffic.unrouted_ids),
        "processed": sum(p.processed for p in processors.values()),
        "duplicates_skipped": sum(p.duplicates for p in processors.values()),
    }
    dlq_counts = Counter(record["queue"] for record in dead_letters)
    return SimulationResult(
        options=SimulationOptions(seed=seed, workload=spec, faults=rates, database_url=database_url),
        workload=workload,
        snapshot=found.snapshot,
        violations=found.violations,
        faults_injected=injector.injected,
        counters=counters,
        durations=found.durations,
        outcomes=found.outcomes,
        virtual_seconds=round(run_seconds, 3),
        wall_seconds=time.perf_counter() - started,
        history=found.history,
        dead_letters=[{k: v for k, v in record.items() if k != "message_id"} for record in dead_letters],
        stack="real",
        extra={
            "quiet_before_timeout": quiet,
            "saga_deadline_seconds": saga_deadline_seconds,
            "arrival_scale": arrival_scale,
            "messages_left_in_queues": dict(sorted(left.items())),
            "dead_letters_per_queue": {spec.dlq: dlq_counts.get(spec.name, 0) for spec in t.WORK_QUEUES},
        },
    )
