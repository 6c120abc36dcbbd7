"""Deterministic saga simulation: the production handlers on SQLite, an in-memory broker
and a virtual clock, with seeded faults; then an invariant check and a report."""

from __future__ import annotations

import asyncio
import json
import random
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

import consumers.orders as orders
import consumers.stock as stock
from contracts import BusinessRuleError, TransientError
from contracts.envelope import parse_envelope
from infra import topology as t
from infra.clock import VirtualClock
from infra.db import create_engine
from infra.pipeline import Handler, MessageProcessor
from infra.schema import upgrade
from infra.services import ORCHESTRATOR, build_services, make_processor, sweep_deadlines
from infra.settings import Settings
from infra.sqlite_direct import create_direct_sqlite_engine
from infra.transport.memory import MemoryBroker
from outbox.ports import OutgoingMessage, Publisher
from outbox.relay import Relay
from outbox.uow import UnitOfWork
from sagas.orchestrator import Orchestrator
from sagas.simulation.faults import FaultRates
from sagas.simulation.invariants import Snapshot, Violation, check
from sagas.simulation.workload import Workload, WorkloadSpec, generate
from sagas.tables import saga_deadlines

log = structlog.get_logger("compensa.simulate")

#: Participants whose handlers the fault injector may break (the saga copes with them).
FAULTY_SERVICES = ("stock", "payments")
OUTCOME_TYPES = frozenset({"order.completed", "order.cancelled", "order.rejected"})


def min_deadline(orchestrator: Orchestrator) -> timedelta:
    """No saga deadline is shorter than this, so a deadline armed at t is due at t + this, or later."""
    return min(
        deadline
        for definition in orchestrator.definitions.values()
        for deadline in [step.deadline for step in definition.steps] + [definition.compensation_deadline]
    )


def _earliest(a: Any, b: Any) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


class RelayCrash(Exception):
    """The relay process died after the broker confirmed, before the outbox was marked."""


@dataclass
class SimulationOptions:
    seed: int = 1
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    faults: FaultRates = field(default_factory=FaultRates)
    database_url: str | None = None
    #: Virtual seconds one delivery takes to process, drawn uniformly in this range.
    service_time: tuple[float, float] = (0.001, 0.02)
    max_attempts: int = 5
    # Seams for running deliberately broken variants, to prove the checker catches them.
    # The CLI never sets these; the defaults are the product as deployed.
    #: The saga definitions, for the saga service and the deadline sweeper alike.
    orchestrator: Orchestrator = ORCHESTRATOR
    #: The unit of work every service commits through (a subclass may break the inbox).
    unit_of_work: type[UnitOfWork] = UnitOfWork
    #: service -> message type -> handler replacing the production one.
    handler_overrides: Mapping[str, Mapping[str, Handler]] = field(default_factory=dict)
    #: Wraps the publisher the relays hand their batches to.
    relay_publisher: Callable[[Publisher], Publisher] | None = None


@dataclass
class SimulationResult:
    options: SimulationOptions
    workload: Workload
    snapshot: Snapshot
    violations: list[Violation]
    faults_injected: Counter[str]
    counters: dict[str, int]
    durations: dict[str, float]
    outcomes: dict[str, int]
    virtual_seconds: float
    wall_seconds: float
    history: dict[str, list[dict[str, Any]]]
    dead_letters: list[dict[str, str]]
    #: "simulated" (virtual time, in-memory broker) or "real" (PostgreSQL + RabbitMQ, wall time).
    stack: str = "simulated"
    #: What only one kind of run knows (the real stack: queue depths, dead letters per queue).
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations


class Simulation:
    """One seeded run; every random choice draws from `self.rng`, in a fixed order."""

    def __init__(self, options: SimulationOptions, on_progress: Callable[[int, int], None] | None = None) -> None:
        self.options = options
        self.rng = random.Random(options.seed)
        self.clock = VirtualClock()
        self.broker = MemoryBroker(self.clock)
        # Defaults plus these, never COMPENSA_* from the environment: a seed must replay
        # the same run on any machine (gateway limit, reservation TTL, ...).
        self.settings = Settings.model_construct(
            max_attempts=options.max_attempts, retry_base_seconds=0.5, retry_max_seconds=8.0
        )
        self.faults = options.faults
        self.injected: Counter[str] = Counter()
        self.on_progress = on_progress
        self.finished: set[str] = set()
        self.dirty_outboxes: set[str] = set()
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None

    # ------------------------------------------------------------ wiring

    def _uow_factory(self) -> Callable[..., UnitOfWork]:
        simulation = self

        class SimulatedUnitOfWork(self.options.unit_of_work):  # type: ignore[name-defined,misc]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                kwargs.setdefault("message_ids", simulation._next_message_id)
                super().__init__(*args, **kwargs)

            async def commit(self) -> None:
                had_messages = bool(self.pending)
                await super().commit()
                if had_messages:
                    simulation.dirty_outboxes.add(self.service)

        return SimulatedUnitOfWork

    def _next_message_id(self) -> uuid.UUID:
        return uuid.UUID(int=self.rng.getrandbits(128), version=4)

    def _chance(self, fault: str) -> bool:
        rate = getattr(self.faults, fault)
        if rate <= 0:
            return False
        hit = self.rng.random() < rate
        if hit:
            self.injected[fault] += 1
        return hit

    def _faulty(self, handler: Handler) -> Handler:
        async def handle(uow: UnitOfWork, message: Any) -> None:
            if self._chance("transient_error"):
                raise TransientError("injected transient participant error")
            if self._chance("permanent_error"):
                raise BusinessRuleError("injected permanent participant error")
            await handler(uow, message)

        return handle

    def _build_processors(self, engine: Any) -> dict[str, MessageProcessor]:
        uow_factory = self._uow_factory()
        processors = {}
        for name, spec in build_services(self.settings, self.options.orchestrator).items():
            handlers = {**spec.handlers(), **self.options.handler_overrides.get(name, {})}
            if name in FAULTY_SERVICES:
                handlers = {k: self._faulty(v) for k, v in handlers.items()}
            processors[spec.queue.name] = make_processor(
                spec, engine, self.clock, self.settings, handlers=handlers, rng=self.rng, uow_factory=uow_factory
            )
            if spec.starts is not None:
                processors[spec.starts.name] = processors[spec.queue.name]
        return processors

    def _build_relays(self, engine: Any) -> dict[str, Relay]:
        simulation = self

        class CrashingPublisher:
            async def publish_batch(self, messages: list[OutgoingMessage]) -> None:
                await simulation.broker.publish_batch(messages)
                if simulation._chance("relay_crash"):
                    raise RelayCrash()

        def note_outcomes(batch: Any) -> None:
            for message in batch:
                if message.type in OUTCOME_TYPES and message.correlation_id not in simulation.finished:
                    simulation.finished.add(message.correlation_id)

        publisher: Publisher = CrashingPublisher()
        if self.options.relay_publisher is not None:
            publisher = self.options.relay_publisher(publisher)
        return {
            name: Relay(engine, name, publisher, self.clock, batch_size=500, on_published=note_outcomes)
            for name in ("orders", "stock", "payments", "ledger", "saga")
        }

    # ------------------------------------------------------------ run

    async def run(self) -> SimulationResult:
        started = time.perf_counter()
        engine = self._engine()
        try:
            await upgrade(engine)
            workload = generate(self.options.workload, self.rng)
            await stock.seed_stock(engine, workload.stock)
            processors = self._build_processors(engine)
            relays = self._build_relays(engine)
            await self._loop(engine, workload, processors, relays)
            snapshot = await build_snapshot(engine, workload, self.broker)
            violations = check(snapshot)
            result = await self._result(engine, workload, snapshot, violations, processors, started)
        finally:
            await engine.dispose()
            if self._tempdir is not None:
                self._tempdir.cleanup()
        return result

    def _engine(self) -> Any:
        """SQLite runs inline (see infra.sqlite_direct); another database through its async driver."""
        url = self.options.database_url
        if url is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="compensa-sim-")
            return create_direct_sqlite_engine(str(Path(self._tempdir.name) / "simulation.db"), throwaway=True)
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
            return create_direct_sqlite_engine(parsed.database)
        return create_engine(url)

    async def _loop(self, engine: Any, workload: Workload, processors: Mapping[str, MessageProcessor], relays: Mapping[str, Relay]) -> None:
        origin = self.clock.now()
        arrivals = list(workload.orders)
        next_arrival = 0
        queue_names = [q.name for q in t.WORK_QUEUES]
        next_expiry_sweep = origin
        uow_factory = self._uow_factory()
        total = len(arrivals)
        due_hint = None
        shortest_deadline = min_deadline(self.options.orchestrator)
        while True:
            now = self.clock.now()
            while next_arrival < total and origin + timedelta(seconds=arrivals[next_arrival].at_seconds) <= now:
                planned = arrivals[next_arrival]
                await orders.place_order(
                    engine,
                    self.clock,
                    order_id=planned.order_id,
                    customer_id=planned.customer_id,
                    lines=list(planned.lines),
                    currency=workload.spec.currency,
                    payment_token=planned.payment_token,
                    uow_factory=uow_factory,
                )
                next_arrival += 1
            await self._relay(relays)
            self.broker.release_due()
            if due_hint is not None and now >= due_hint:
                await sweep_deadlines(engine, self.clock, orchestrator=self.options.orchestrator, uow_factory=uow_factory)
                # Deadlines the sweep armed are committed, so the table knows them all.
                due_hint = await self._earliest_deadline(engine, origin)
            if now >= next_expiry_sweep:
                await stock.expire_reservations(engine, self.clock)
                next_expiry_sweep = now + timedelta(seconds=60)
            if self.on_progress is not None:
                self.on_progress(len(self.finished), total)

            ready = [name for name in queue_names if self.broker.depth(name)]
            if ready:
                queue = self.rng.choice(ready)
                await self._deliver_one(queue, processors)
                if queue in (t.SAGA_EVENTS.name, t.SAGA_STARTS.name):
                    # A saga transition may have armed a deadline, due no sooner than this.
                    due_hint = _earliest(due_hint, self.clock.now() + shortest_deadline)
                continue
            if self.dirty_outboxes:
                continue
            candidates = []
            if next_arrival < total:
                candidates.append(origin + timedelta(seconds=arrivals[next_arrival].at_seconds))
            if self.broker.next_due() is not None:
                candidates.append(self.broker.next_due())
            if due_hint is not None:
                candidates.append(due_hint)
            if not candidates:
                break
            self.clock.set(max(min(candidates), now))

    async def _earliest_deadline(self, engine: Any, origin: Any) -> Any:
        async with engine.connect() as connection:
            due = (await connection.execute(select(func.min(saga_deadlines.c.due_at)))).scalar()
        if due is None:
            return None
        return due if due.tzinfo else due.replace(tzinfo=origin.tzinfo)

    async def _relay(self, relays: Mapping[str, Relay]) -> None:
        while self.dirty_outboxes:
            service = sorted(self.dirty_outboxes)[0]
            self.dirty_outboxes.discard(service)
            try:
                await relays[service].drain()
            except RelayCrash:
                # The batch was published but not marked: it will be published again.
                self.dirty_outboxes.add(service)

    async def _deliver_one(self, queue: str, processors: Mapping[str, MessageProcessor]) -> None:
        depth = self.broker.depth(queue)
        index = self.rng.randrange(depth) if depth > 1 and self._chance("reorder") else 0
        delivery = self.broker.get(queue, index)
        assert delivery is not None
        self.clock.advance(self.rng.uniform(*self.options.service_time))
        if self._chance("delay"):
            self.broker.hold(delivery, self.rng.uniform(0.01, self.faults.max_delay_seconds))
            return
        if queue in (t.STOCK_COMMANDS.name, t.PAYMENTS_COMMANDS.name) and self._chance("silence"):
            self.broker.hold(delivery, self.faults.silence_seconds)
            return
        if self._chance("duplicate"):
            self.broker.duplicate(delivery)
        if self._chance("lost_ack") or self._chance("consumer_crash"):
            # The effect commits, the ack never arrives: the broker redelivers.
            delivery.ack = delivery.requeue  # type: ignore[method-assign]
        await processors[queue](delivery)
        if not delivery.settled:
            await delivery.requeue()

    # ------------------------------------------------------------ results

    async def _result(self, engine: Any, workload: Workload, snapshot: Snapshot, violations: list[Violation], processors: Mapping[str, MessageProcessor], started: float) -> SimulationResult:
        durations, outcomes, history = await read_outcomes(engine, violations)
        dead_letters = [
            dead_letter_record(spec.name, stored.body, stored.headers)
            for spec in t.WORK_QUEUES
            for stored in self.broker.dead_letters(spec.name)
        ]
        stats = self.broker.stats
        counters = {
            "published": stats.published,
            "delivered": stats.delivered,
            "acked": stats.acked,
            "requeued": stats.requeued,
            "retried": stats.retried,
            "dead_lettered": stats.dead_lettered,
            "unrouted_events": stats.unrouted_events,
            "processed": sum(p.processed for p in processors.values()),
            "duplicates_skipped": sum(p.duplicates for p in processors.values()),
        }
        return SimulationResult(
            options=self.options,
            workload=workload,
            snapshot=snapshot,
            violations=violations,
            faults_injected=self.injected,
            counters=counters,
            durations=durations,
            outcomes=outcomes,
            virtual_seconds=round((self.clock.now() - VirtualClock().now()).total_seconds(), 6),
            wall_seconds=time.perf_counter() - started,
            history=history,
            dead_letters=dead_letters,
        )


async def read_outcomes(
    engine: Any, violations: list[Violation]
) -> tuple[dict[str, float], dict[str, int], dict[str, list[dict[str, Any]]]]:
    """Per saga: duration and outcome; the history of the slowest and of every violating saga."""
    from sagas.tables import saga_history, saga_instances

    async with engine.connect() as connection:
        sagas = (await connection.execute(select(saga_instances.c.saga_id, saga_instances.c.status, saga_instances.c.started_at, saga_instances.c.updated_at))).all()
        durations = {}
        outcomes: Counter[str] = Counter()
        for row in sagas:
            outcomes[row.status] += 1
            durations[row.saga_id] = round((row.updated_at - row.started_at).total_seconds(), 6)
        wanted = set(v.saga_id for v in violations if v.saga_id)
        if durations:
            wanted.add(max(sorted(durations), key=lambda k: durations[k]))
        history: dict[str, list[dict[str, Any]]] = {}
        if wanted:
            rows = (
                await connection.execute(
                    select(saga_history).where(saga_history.c.saga_id.in_(sorted(wanted))).order_by(saga_history.c.saga_id, saga_history.c.version)
                )
            ).all()
            origin = min(r.started_at for r in sagas)
            for r in rows:
                history.setdefault(r.saga_id, []).append(
                    {
                        "version": r.version,
                        "at_seconds": round((r.at - origin).total_seconds(), 6),
                        "trigger": r.trigger,
                        "from": r.from_status,
                        "to": r.to_status,
                        "step": r.step,
                        "note": r.note,
                        "sent": [s["type"] for s in json.loads(r.sent)],
                    }
                )
    return durations, dict(sorted(outcomes.items())), history


def dead_letter_record(queue: str, body: bytes, headers: Mapping[str, Any]) -> dict[str, str]:
    """One dead letter as the report lists it."""
    return {
        "queue": queue,
        "type": _type_of(body),
        "saga_id": str(headers.get(t.H_SAGA_ID, "")),
        "reason_class": str(headers.get(t.H_REASON_CLASS, "")),
        "reason": str(headers.get(t.H_REASON, "")),
        "attempts": str(headers.get(t.H_ATTEMPT, "")),
    }


def _type_of(body: bytes) -> str:
    try:
        return parse_envelope(body).type
    except Exception:  # noqa: BLE001 - only used to label a dead letter
        return "<undecodable>"


async def build_snapshot(engine: Any, workload: Workload, broker: MemoryBroker | None) -> Snapshot:
    from infra.snapshot import read_snapshot

    snapshot = await read_snapshot(engine, workload, broker)
    if broker is not None:
        snapshot.marked_sent_ids = await outbox_sent_ids(engine)
    return snapshot


async def outbox_sent_ids(engine: Any) -> set[str]:
    """Message ids of every outbox row marked sent, across the services."""
    from infra.services import OUTBOX_SERVICES
    from outbox.tables import tables_for

    sent: set[str] = set()
    async with engine.connect() as connection:
        for service in OUTBOX_SERVICES:
            outbox = tables_for(service).outbox
            rows = await connection.execute(select(outbox.c.message_id).where(outbox.c.sent_at.is_not(None)))
            sent.update(str(row.message_id) for row in rows)
    return sent


def run_simulation(options: SimulationOptions, on_progress: Callable[[int, int], None] | None = None) -> SimulationResult:
    return asyncio.run(Simulation(options, on_progress).run())
