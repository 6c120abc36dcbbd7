"""Deterministic saga simulation: the production handlers on SQLite, an in-memory broker
and a virtual clock, with seeded faults; then an invariant check and a report."""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

import consumers.orders as orders
import consumers.stock as stock
from consumers.payments.breaker import BreakerState, CircuitBreaker, Transition
from consumers.payments.gateway import PaymentGateway
from infra import topology as t
from infra.bootstrap import Registry, bootstrap
from infra.clock import VirtualClock
from infra.db import create_engine
from infra.pipeline import MessageProcessor
from infra.schema import upgrade
from infra.settings import Settings
from infra.simulation.faults import FaultInjector, GatewayOutages, RelayCrash
from infra.simulation.readback import Observed, dead_letter_record, read_back
from infra.simulation.sqlite_facade import create_direct_sqlite_engine
from infra.transport.memory import MemoryBroker
from outbox.ports import Publisher
from outbox.relay import Relay
from outbox.uow import Handler, UnitOfWork
from sagas.orchestrator import SERVICE as SAGA_SERVICE
from sagas.orchestrator import Orchestrator
from sagas.simulation.faults import FaultRates
from sagas.simulation.invariants import Snapshot, Violation
from sagas.simulation.workload import Workload, WorkloadSpec, generate
from sagas.tables import saga_instances

log = structlog.get_logger("compensa.simulate")

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
    #: The saga definitions, for the saga service and the deadline sweeper alike
    #: (None: the order saga with the default timings).
    orchestrator: Orchestrator | None = None
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
    #: Per circuit breaker: its transitions, counted and listed (`breaker_report`).
    breakers: dict[str, Any] = field(default_factory=dict)

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
        self.settings = Settings.model_construct(max_attempts=options.max_attempts, retry_base_seconds=0.5, retry_max_seconds=8.0)
        self.faults = FaultInjector(options.faults, self.rng)
        self.gateway: GatewayOutages | None = None
        self.transitions: list[Transition] = []
        self.registry = self._bootstrap()
        for breaker in self.registry.breakers.values():
            breaker.subscribe(self.transitions.append)
        self.on_progress = on_progress
        self.finished: set[str] = set()
        self.dirty_outboxes: set[str] = set()
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None

    # ------------------------------------------------------------ wiring

    def _bootstrap(self) -> Registry:
        """The product's services, with the run's seams and faults wired in as they are built."""
        overrides = self.options.handler_overrides
        relay_publisher = self.options.relay_publisher

        def wrap_handlers(service: str, handlers: Mapping[str, Handler]) -> Mapping[str, Handler]:
            return self.faults.wrap_handlers(service, {**handlers, **overrides.get(service, {})})

        def wrap_publisher(inner: Publisher) -> Publisher:
            publisher = self.faults.publisher(inner)
            return relay_publisher(publisher) if relay_publisher is not None else publisher

        def wrap_gateway(inner: PaymentGateway) -> PaymentGateway:
            self.gateway = self.faults.gateway(inner, self.clock)
            return self.gateway

        # The breaker runs on virtual time; its transitions go to the report, not a database.
        return bootstrap(
            self.settings,
            orchestrator=self.options.orchestrator,
            wrap_handlers=wrap_handlers,
            wrap_publisher=wrap_publisher,
            wrap_gateway=wrap_gateway,
            clock=self.clock,
            record_breakers=False,
        )

    def _uow_factory(self) -> Callable[..., UnitOfWork]:
        simulation = self

        class SimulatedUnitOfWork(self.options.unit_of_work):  # type: ignore[name-defined,misc]  # a base chosen at run time
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

    def _build_processors(self, engine: Any) -> dict[str, MessageProcessor]:
        """One processor per queue; a service's start queue shares its processor."""
        uow_factory = self._uow_factory()
        processors = {}
        for name, service in self.registry.services.items():
            processors[service.queue.name] = self.registry.processor(
                name, engine, self.clock, rng=self.rng, uow_factory=uow_factory
            )
            if service.starts is not None:
                processors[service.starts.name] = processors[service.queue.name]
        return processors

    def _build_relays(self, engine: Any) -> dict[str, Relay]:
        simulation = self

        def note_outcomes(batch: Any) -> None:
            for message in batch:
                if message.type in OUTCOME_TYPES and message.correlation_id not in simulation.finished:
                    simulation.finished.add(message.correlation_id)

        publisher = self.registry.publisher(self.broker)
        return {
            name: Relay(engine, name, publisher, self.clock, batch_size=500, on_published=note_outcomes)
            for name in self.registry.services
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
            result = await self._result(engine, workload, processors, started)
        finally:
            await engine.dispose()
            if self._tempdir is not None:
                self._tempdir.cleanup()
        return result

    def _engine(self) -> Any:
        """SQLite runs inline (see sqlite_facade.py); another database through its async driver."""
        url = self.options.database_url
        if url is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="compensa-sim-")
            return create_direct_sqlite_engine(str(Path(self._tempdir.name) / "simulation.db"), throwaway=True)
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
            return create_direct_sqlite_engine(parsed.database)
        return create_engine(url)

    async def _loop(
        self, engine: Any, workload: Workload, processors: Mapping[str, MessageProcessor], relays: Mapping[str, Relay]
    ) -> None:
        origin = self.clock.now()
        arrivals = list(workload.orders)
        next_arrival = 0
        queue_names = [q.name for q in t.WORK_QUEUES]
        next_expiry_sweep = origin
        uow_factory = self._uow_factory()
        total = len(arrivals)
        due_hint = None
        orchestrator = self.registry.orchestrator
        shortest_deadline = min_deadline(orchestrator)

        def begin_sweep() -> UnitOfWork:
            return uow_factory(engine, SAGA_SERVICE, self.clock)

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
                await orchestrator.sweep_deadlines(begin_sweep)
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
            due = (await connection.execute(select(func.min(saga_instances.c.deadline_at)))).scalar()
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
        chance = self.faults.chance
        depth = self.broker.depth(queue)
        index = self.rng.randrange(depth) if depth > 1 and chance("reorder") else 0
        delivery = self.broker.get(queue, index)
        assert delivery is not None
        self.clock.advance(self.rng.uniform(*self.options.service_time))
        if chance("delay"):
            self.broker.hold(delivery, self.rng.uniform(0.01, self.options.faults.max_delay_seconds))
            return
        if queue in (t.STOCK_COMMANDS.name, t.PAYMENTS_COMMANDS.name) and chance("silence"):
            self.broker.hold(delivery, self.options.faults.silence_seconds)
            return
        if chance("duplicate"):
            self.broker.duplicate(delivery)
        if chance("lost_ack") or chance("consumer_crash"):
            # The effect commits, the ack never arrives: the broker redelivers.
            delivery = self.broker.lose_ack(delivery)
        await processors[queue](delivery)
        if not delivery.settled:
            await delivery.requeue()

    # ------------------------------------------------------------ results

    async def _result(
        self, engine: Any, workload: Workload, processors: Mapping[str, MessageProcessor], started: float
    ) -> SimulationResult:
        stats = self.broker.stats
        observed = Observed(
            published_ids=stats.published_ids,
            consumed_ids=stats.settled_ids,
            dead_lettered=stats.dead_letter_reasons,
            unrouted_ids=stats.unrouted_ids,
            messages_left=self.broker.work_depth(),
        )
        found = await read_back(engine, workload, observed)
        dead_letters = [
            dead_letter_record(spec.name, stored.body, stored.headers)
            for spec in t.WORK_QUEUES
            for stored in self.broker.dead_letters(spec.name)
        ]
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
            snapshot=found.snapshot,
            violations=found.violations,
            faults_injected=self.faults.injected,
            counters=counters,
            durations=found.durations,
            outcomes=found.outcomes,
            virtual_seconds=round((self.clock.now() - VirtualClock().now()).total_seconds(), 6),
            wall_seconds=time.perf_counter() - started,
            history=found.history,
            dead_letters=dead_letters,
            breakers={
                name: breaker_report(breaker, self.transitions, VirtualClock().now(), self.gateway)
                for name, breaker in self.registry.breakers.items()
            },
        )


#: The most transitions a report lists one by one (all are counted).
LISTED_TRANSITIONS = 50


def breaker_report(
    breaker: CircuitBreaker, transitions: list[Transition], origin: datetime, gateway: GatewayOutages | None
) -> dict[str, Any]:
    """What `breaker` did in a run: transitions counted and listed, calls refused, calls that reached the gateway."""
    mine = [step for step in transitions if step.circuit == breaker.name]

    def seconds(at: datetime) -> float:
        return round((at - origin).total_seconds(), 6)

    opened = [step for step in mine if step.new is BreakerState.OPEN]
    return {
        "opened": len(opened),
        "half_opened": sum(step.new is BreakerState.HALF_OPEN for step in mine),
        "closed": sum(step.new is BreakerState.CLOSED for step in mine),
        "first_opened_at_seconds": seconds(opened[0].at) if opened else None,
        "final_state": breaker.state.value,
        "refused_calls": breaker.rejected,
        "gateway_calls": gateway.calls if gateway is not None else None,
        "gateway_failures": gateway.failed if gateway is not None else None,
        "transitions": [
            {"at_seconds": seconds(step.at), "from": step.old.value, "to": step.new.value, "reason": step.reason}
            for step in mine[:LISTED_TRANSITIONS]
        ],
    }


def run_simulation(options: SimulationOptions, on_progress: Callable[[int, int], None] | None = None) -> SimulationResult:
    return asyncio.run(Simulation(options, on_progress).run())
