"""Deterministic saga simulation: the production handlers on SQLite, an in-memory broker
and a virtual clock, with seeded faults; then an invariant check and a report."""

from __future__ import annotations

import asyncio
import heapq
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

from consumers.payments.breaker import BreakerState, CircuitBreaker, Transition
from consumers.payments.gateway import PaymentGateway
from contracts import BusinessRuleError, TransientError
from contracts.routing import DEFAULT_EXCHANGE
from infra import topology as t
from infra.apps import ORDER_APP
from infra.bootstrap import Registry, bootstrap, orchestrator_for
from infra.clock import VirtualClock
from infra.db import create_engine
from infra.pipeline import MessageProcessor
from infra.references import attribute_of, import_from, split_reference
from infra.schema import upgrade
from infra.settings import Settings
from infra.simulation.faults import FaultInjector, GatewayOutages, RelayCrash
from infra.simulation.readback import (
    Observed,
    dead_letter_record,
    read_history_counts,
    read_saga_times,
)
from infra.simulation.scenario import scenario_for
from infra.simulation.sqlite_facade import create_direct_sqlite_engine
from infra.transport.memory import MemoryBroker, StoredMessage
from outbox.ports import Publisher
from outbox.relay import Relay
from outbox.uow import Handler, UnitOfWork
from sagas.app import SagaApp
from sagas.orchestrator import SERVICE as SAGA_SERVICE
from sagas.orchestrator import AppliedTransition, Orchestrator
from sagas.simulation import coverage, liveness
from sagas.simulation.faults import FaultRates
from sagas.simulation.invariants import Snapshot, Violation
from sagas.simulation.trace import Event
from sagas.simulation.workload import WorkloadSpec
from sagas.state import SagaStatus
from sagas.tables import saga_instances

log = structlog.get_logger("compensa.simulate")


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
    # The CLI sets them only through `--variant` (`load_variant`); the defaults are the product as deployed.
    #: The saga definitions, for the saga service and the deadline sweeper alike
    #: (None: the order saga with the default timings).
    orchestrator: Orchestrator | None = None
    #: The unit of work every service commits through (a subclass may break the inbox).
    unit_of_work: type[UnitOfWork] = UnitOfWork
    #: service -> message type -> handler replacing the production one.
    handler_overrides: Mapping[str, Mapping[str, Handler]] = field(default_factory=dict)
    #: Wraps the publisher the relays hand their batches to.
    relay_publisher: Callable[[Publisher], Publisher] | None = None
    #: A liveness run: faults stop at `heal_after` virtual seconds (None: when the last
    #: order has arrived), and every saga must then reach an outcome within `liveness_bound`
    #: seconds (None: `liveness.default_bound`). The run itself ends at that bound.
    liveness: bool = False
    heal_after: float | None = None
    liveness_bound: float | None = None
    #: The simulated operator: this many virtual seconds after a saga reaches
    #: compensation_failed it retries its compensation, and after a message is
    #: dead-lettered it replays it (each at most `OPERATOR_TRIES` times). None: no operator.
    operator_after: float | None = None
    #: Record the event trace (`SimulationResult.trace`) for the determinism self-check.
    trace: bool = False
    #: The saga application simulated (`--app`); the workload's order-only fields (SKUs,
    #: stock, declines) apply to the order app, any other draws its own from `workload.sagas`.
    app: SagaApp = ORDER_APP


@dataclass
class SimulationResult:
    options: SimulationOptions
    #: The drawn workload: `.spec`, and `.orders`, the planned sagas (an app's are `PlannedSaga`s).
    workload: Any
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
    #: Coverage goal -> how often its situation occurred (`sagas.simulation.coverage`).
    coverage: dict[str, int] = field(default_factory=dict)
    #: A liveness run's heal time and bound (virtual seconds); None otherwise.
    liveness: dict[str, float] | None = None
    #: What the simulated operator did; None without one.
    operator: dict[str, int] | None = None
    #: Every delivery, publish, transition, heal and operator action in order (`options.trace`).
    trace: list[Event] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


#: How often the simulated operator retries one saga, or replays one message.
OPERATOR_TRIES = 2
#: The seams a variant (`load_variant`) may set.
VARIANT_FIELDS = frozenset({"orchestrator", "unit_of_work", "handler_overrides", "relay_publisher"})


def load_variant(reference: str, search_path: str | None = None) -> dict[str, Any]:
    """The SimulationOptions seams `module:attribute` names: a mapping of them, or a function returning one.

    A variant is a deliberately broken (or instrumented) build of the product, for
    proving that the checker catches what it should; the CLI's `--variant` and every
    swarm worker load it by name. `search_path` (default: the working directory) goes
    first on `sys.path`, as `uvicorn module:app` does, so a test module can be named.
    """
    parts = split_reference(reference)
    if parts is None:
        raise ValueError(f"a variant is module:attribute, got {reference!r}")
    module_name, attribute = parts
    try:
        target = attribute_of(import_from(module_name, search_path), attribute)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load variant {reference!r}: {exc}") from None
    seams = target() if callable(target) else target
    if not isinstance(seams, Mapping):
        raise ValueError(f"variant {reference!r} must be (or return) a mapping of {', '.join(sorted(VARIANT_FIELDS))}")
    unknown = sorted(set(seams) - VARIANT_FIELDS)
    if unknown:
        raise ValueError(
            f"variant {reference!r} sets {', '.join(unknown)}; a variant sets only {', '.join(sorted(VARIANT_FIELDS))}"
        )
    return dict(seams)


class Simulation:
    """One seeded run; every random choice draws from `self.rng`, in a fixed order."""

    def __init__(self, options: SimulationOptions, on_progress: Callable[[int, int], None] | None = None) -> None:
        self.options = options
        self.rng = random.Random(options.seed)
        self.clock = VirtualClock()
        self.origin = self.clock.now()
        # Defaults plus these, never COMPENSA_* from the environment: a seed must replay
        # the same run on any machine (gateway limit, reservation TTL, ...).
        self.settings = Settings.model_construct(max_attempts=options.max_attempts, retry_base_seconds=0.5, retry_max_seconds=8.0)
        # A liveness run learns when the faults stop once the workload is drawn (`run`).
        self.faults = FaultInjector(options.faults, self.rng, clock=self.clock)
        self.scenario = scenario_for(options.app)
        if options.app is not ORDER_APP:
            self.faults.faulty_services = tuple(p.name for p in options.app.participants if p.faulty)
        self.gateway: GatewayOutages | None = None
        self.transitions: list[Transition] = []
        self.trace: list[Event] | None = [] if options.trace else None
        #: The simulated operator's to-do list: (due, sequence, action, key).
        self.operator_due: list[tuple[datetime, int, str, Any]] = []
        self.operator_sequence = 0
        self.operator_counts: Counter[str] = Counter()
        self.operator_tries: Counter[str] = Counter()
        self.dead_letters_seen: dict[str, int] = {}
        #: Queue -> when its consumer reconnects after a broker restart.
        self.reconnect_at: dict[str, datetime] = {}
        #: A liveness run's heal time, bound (seconds) and end (`_plan_liveness`).
        self.heal_at: datetime | None = None
        self.bound: float | None = None
        self.horizon: datetime | None = None
        self.registry = self._bootstrap()
        self.broker = MemoryBroker(self.clock, queues=self.registry.queues)
        self.queue_names = [queue.name for queue in self.registry.queues]
        #: The saga service's queues (a delivery there may arm a deadline), and the command
        #: queues (whose participants may fall silent).
        self.saga_queues = {q.name for q in self.registry.queues if q.service == SAGA_SERVICE}
        self.command_queues = {q.name for q in self.registry.queues if q.exchange == t.COMMANDS}
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
            orchestrator=self._orchestrator(),
            wrap_handlers=wrap_handlers,
            wrap_publisher=wrap_publisher,
            wrap_gateway=wrap_gateway,
            clock=self.clock,
            record_breakers=False,
            app=self.options.app,
        )

    def _orchestrator(self) -> Orchestrator | None:
        """The run's orchestrator, built with an observer when the trace or the operator needs one."""
        given = self.options.orchestrator
        if not self.options.trace and self.options.operator_after is None:
            return given
        if given is None:
            return orchestrator_for(self.settings, observers=(self._observe,), app=self.options.app)
        return Orchestrator(list(given.definitions.values()), observers=(*given.observers, self._observe))

    def _observe(self, applied: AppliedTransition) -> None:
        after = applied.after
        self._note(
            "transition",
            after.saga_id,
            applied.before.status.value if applied.before else None,
            after.status.value,
            applied.trigger,
            after.version,
        )
        if self.options.operator_after is not None and after.status is SagaStatus.COMPENSATION_FAILED:
            self._schedule("retry", after.saga_id)

    def _note(self, kind: str, *details: Any) -> None:
        """Add an event to the trace (when tracing), at the virtual time it happened."""
        if self.trace is not None:
            self.trace.append((round((self.clock.now() - self.origin).total_seconds(), 6), kind, *details))

    def _uow_factory(self) -> Callable[..., UnitOfWork]:
        simulation = self

        class SimulatedUnitOfWork(self.options.unit_of_work):  # type: ignore[name-defined,misc]  # a base chosen at run time
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                kwargs.setdefault("message_ids", simulation._next_message_id)
                super().__init__(*args, **kwargs)

            async def commit(self) -> None:
                had_messages = bool(self.pending)
                try:
                    await super().commit()
                finally:
                    # Even a commit that reported failure may have written its outbox
                    # rows (`commit_unknown`); a drain that finds none costs nothing.
                    if had_messages:
                        simulation.dirty_outboxes.add(self.service)

        return SimulatedUnitOfWork

    def _next_message_id(self) -> uuid.UUID:
        return uuid.UUID(int=self.rng.getrandbits(128), version=4)

    def _build_processors(self, engine: Any) -> dict[str, MessageProcessor]:
        """One processor per queue; a service's start queue shares its processor."""
        uow_factory = self.faults.units_of_work(self._uow_factory())
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
                if message.type in simulation.scenario.outcome_types and message.correlation_id not in simulation.finished:
                    simulation.finished.add(message.correlation_id)
                simulation._note("publish", message.message_id, message.type, message.correlation_id)

        publisher = self.registry.publisher(self.broker)
        return {
            name: Relay(engine, name, publisher, self.clock, batch_size=500, on_published=note_outcomes)
            for name in (*self.registry.services, *self.scenario.start_outboxes)
        }

    # ------------------------------------------------------------ run

    async def run(self) -> SimulationResult:
        started = time.perf_counter()
        engine = self._engine()
        try:
            await upgrade(engine)
            workload = self.scenario.generate(self.options.workload, self.rng)
            self._plan_liveness(workload)
            await self.scenario.prepare(engine, workload)
            processors = self._build_processors(engine)
            relays = self._build_relays(engine)
            await self._loop(engine, workload, processors, relays)
            result = await self._result(engine, workload, processors, started)
        finally:
            await engine.dispose()
            if self._tempdir is not None:
                self._tempdir.cleanup()
        return result

    def _plan_liveness(self, workload: Any) -> None:
        """A liveness run: when the faults stop, the bound, and the end of the run."""
        options = self.options
        if not options.liveness:
            return
        last_arrival = workload.orders[-1].at_seconds if workload.orders else 0.0
        heal_after = options.heal_after if options.heal_after is not None else last_arrival
        self.heal_at = self.origin + timedelta(seconds=heal_after)
        self.faults.stop_at = self.heal_at
        self.bound = (
            options.liveness_bound
            if options.liveness_bound is not None
            else liveness.default_bound(
                self.registry.orchestrator.definitions.values(),
                options.faults,
                retry_max_seconds=self.settings.retry_max_seconds,
                max_attempts=self.settings.max_attempts,
                operator_after=options.operator_after,
            )
        )
        # Every saga is due by then; running on past it would only hide a stuck one.
        self.horizon = self.origin + timedelta(seconds=max(heal_after, last_arrival) + self.bound)

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
        self, engine: Any, workload: Any, processors: Mapping[str, MessageProcessor], relays: Mapping[str, Relay]
    ) -> None:
        origin = self.clock.now()
        arrivals = list(workload.orders)
        next_arrival = 0
        queue_names = self.queue_names
        next_expiry_sweep = origin
        uow_factory = self._uow_factory()
        total = len(arrivals)
        due_hint = None
        orchestrator = self.registry.orchestrator
        shortest_deadline = min_deadline(orchestrator)

        def begin_sweep() -> UnitOfWork:
            return uow_factory(engine, SAGA_SERVICE, self.clock)

        heal_pending = self.heal_at
        while True:
            now = self.clock.now()
            if self.horizon is not None and now > self.horizon:
                break
            if heal_pending is not None and now >= heal_pending:
                self._note("heal")
                heal_pending = None
            while next_arrival < total and origin + timedelta(seconds=arrivals[next_arrival].at_seconds) <= now:
                planned = arrivals[next_arrival]
                self._note("place", planned.saga_id)
                await self.scenario.place(engine, self.clock, planned, workload, uow_factory)
                next_arrival += 1
            await self._relay(relays)
            self.broker.release_due()
            if due_hint is not None and now >= due_hint:
                await orchestrator.sweep_deadlines(begin_sweep)
                # Deadlines the sweep armed are committed, so the table knows them all.
                due_hint = await self._earliest_deadline(engine, origin)
            if now >= next_expiry_sweep:
                await self.scenario.tick(engine, self.clock)
                next_expiry_sweep = now + timedelta(seconds=60)
            if self.operator_due and self.operator_due[0][0] <= now:
                if await self._operate(engine, uow_factory):
                    # A retried compensation armed a deadline, due no sooner than this.
                    due_hint = _earliest(due_hint, self.clock.now() + shortest_deadline)
                continue
            if self.on_progress is not None:
                self.on_progress(len(self.finished), total)

            ready = [name for name in queue_names if self.broker.depth(name) and self._connected(name)]
            if ready:
                queue = self.rng.choice(ready)
                await self._deliver_one(queue, processors)
                if self.options.operator_after is not None and self.broker.stats.dead_lettered:
                    self._notice_dead_letters()
                if queue in self.saga_queues:
                    # A saga transition may have armed a deadline, due no sooner than this.
                    due_hint = _earliest(due_hint, self.clock.now() + shortest_deadline)
                continue
            if self.dirty_outboxes and self.broker.available:
                continue
            candidates = []
            if next_arrival < total:
                candidates.append(origin + timedelta(seconds=arrivals[next_arrival].at_seconds))
            if self.broker.next_due() is not None:
                candidates.append(self.broker.next_due())
            if due_hint is not None:
                candidates.append(due_hint)
            if self.operator_due:
                candidates.append(self.operator_due[0][0])
            if self.broker.down_until is not None and not self.broker.available:
                candidates.append(self.broker.down_until)
            candidates.extend(back for back in self.reconnect_at.values() if back > now)
            if not candidates:
                break
            if heal_pending is not None:
                candidates.append(heal_pending)
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
            except TransientError:
                # Unconfirmed (the broker is restarting): the relay backs off until it is back.
                self.dirty_outboxes.add(service)
                return

    async def _deliver_one(self, queue: str, processors: Mapping[str, MessageProcessor]) -> None:
        chance = self.faults.chance
        depth = self.broker.depth(queue)
        index = self.rng.randrange(depth) if depth > 1 and chance("reorder") else 0
        delivery = self.broker.get(queue, index)
        assert delivery is not None
        self.clock.advance(self.rng.uniform(*self.options.service_time))
        if chance("delay"):
            self._note("delay", queue, delivery.message_id)
            self.broker.hold(delivery, self.rng.uniform(0.01, self.options.faults.max_delay_seconds))
            return
        if queue in self.command_queues and chance("silence"):
            self._note("silence", queue, delivery.message_id)
            self.broker.hold(delivery, self.options.faults.silence_seconds)
            return
        duplicated = chance("duplicate")
        if duplicated:
            self.broker.duplicate(delivery)
        ack_lost = chance("lost_ack") or chance("consumer_crash")
        if ack_lost:
            # The effect commits, the ack never arrives: the broker redelivers.
            delivery = self.broker.lose_ack(delivery)
        if chance("broker_restart"):
            self._restart_broker()
        if chance("clock_jump"):
            # A step of the clock every process sees (an NTP step, a resumed VM): deadlines
            # of work in flight, this delivery's included, fall due before it is done.
            jump = self.rng.uniform(1.0, max(1.0, self.options.faults.clock_jump_seconds))
            self._note("clock_jump", round(jump, 6))
            self.clock.advance(jump)
        self._note("deliver", queue, delivery.message_id, delivery.redelivered, duplicated, ack_lost)
        try:
            await processors[queue](delivery)
        except TransientError:
            if not delivery.channel_closed:
                raise
            # It could not be settled over the closed channel: the broker has it back.
        if not delivery.settled:
            await delivery.requeue()

    def _restart_broker(self) -> None:
        """The broker restarts under the delivery in flight; each consumer reconnects a little after it is back."""
        faults = self.options.faults
        returned = self.broker.restart(faults.broker_restart_seconds)
        assert self.broker.down_until is not None
        for name in self.queue_names:
            pause = self.rng.uniform(0.0, faults.broker_reconnect_seconds)
            self.reconnect_at[name] = self.broker.down_until + timedelta(seconds=pause)
        self._note("broker_restart", returned)

    def _connected(self, queue: str) -> bool:
        """Whether the consumer of `queue` is connected (not reconnecting after a broker restart)."""
        back = self.reconnect_at.get(queue)
        if back is None:
            return True
        if self.clock.now() < back:
            return False
        del self.reconnect_at[queue]
        return True

    # ------------------------------------------------------------ the simulated operator

    def _schedule(self, action: str, key: Any) -> None:
        """Put an operator action on the to-do list, `operator_after` from now, unless tried enough."""
        assert self.options.operator_after is not None
        name = f"{action}:{key[1].message_id if action == 'replay' else key}"
        if self.operator_tries[name] >= OPERATOR_TRIES:
            return
        self.operator_tries[name] += 1
        due = self.clock.now() + timedelta(seconds=self.options.operator_after)
        self.operator_sequence += 1
        heapq.heappush(self.operator_due, (due, self.operator_sequence, action, key))

    def _notice_dead_letters(self) -> None:
        """Schedule a replay of each message dead-lettered since the last look."""
        for spec in self.registry.queues:
            waiting = self.broker.queues[spec.dlq]
            seen = self.dead_letters_seen.get(spec.name, 0)
            for stored in list(waiting)[seen:]:
                self._schedule("replay", (spec.name, stored))
            self.dead_letters_seen[spec.name] = len(waiting)

    async def _operate(self, engine: Any, uow_factory: Callable[..., UnitOfWork]) -> bool:
        """Do every operator action that is due; True when a compensation was retried."""
        retried = False
        now = self.clock.now()
        while self.operator_due and self.operator_due[0][0] <= now:
            _due, _sequence, action, key = heapq.heappop(self.operator_due)
            if action == "retry":
                retried |= await self._retry_compensation(engine, uow_factory, key)
            else:
                self._replay(*key)
        return retried

    async def _retry_compensation(self, engine: Any, uow_factory: Callable[..., UnitOfWork], saga_id: str) -> bool:
        """`compensa saga retry`, as an operator would run it."""
        async with uow_factory(engine, SAGA_SERVICE, self.clock) as uow:
            try:
                await self.registry.orchestrator.retry_compensation(uow, saga_id)
            except BusinessRuleError:
                return False  # a late confirmation healed it meanwhile
            await uow.commit()
        self._note("operator_retry", saga_id)
        self.operator_counts["compensations_retried"] += 1
        return True

    def _replay(self, queue: str, stored: StoredMessage) -> None:
        """`compensa dlq replay`: the message goes back to the queue that consumes it, its failure headers gone."""
        original_type = str(stored.headers.get(t.H_ORIGINAL_ROUTING_KEY, ""))
        target = t.consuming_queue(queue, original_type)
        name = target.name if target is not None else queue
        headers = {k: v for k, v in stored.headers.items() if not k.startswith("x-compensa-") and k != "x-death"}
        self.broker.queues[name].append(
            StoredMessage(stored.body, headers, stored.message_id, DEFAULT_EXCHANGE, name, stored.correlation_id)
        )
        self.broker.stats.published += 1
        self._note("operator_replay", name, stored.message_id)
        self.operator_counts["dead_letters_replayed"] += 1
        if name in self.command_queues:
            self.operator_counts["commands_replayed"] += 1

    # ------------------------------------------------------------ results

    async def _result(
        self, engine: Any, workload: Any, processors: Mapping[str, MessageProcessor], started: float
    ) -> SimulationResult:
        stats = self.broker.stats
        observed = Observed(
            published_ids=stats.published_ids,
            consumed_ids=stats.settled_ids,
            dead_lettered=stats.dead_letter_reasons,
            unrouted_ids=stats.unrouted_ids,
            messages_left=self.broker.work_depth(),
        )
        stuck: list[Violation] = []
        if self.heal_at is not None and self.bound is not None:
            times = await read_saga_times(engine, workload, self.origin)
            heal_seconds = (self.heal_at - self.origin).total_seconds()
            stuck = liveness.check(times, heal_at=heal_seconds, bound=self.bound)
        found, app_goals = await self.scenario.read_back(engine, workload, observed, stuck)
        dead_letters = [
            dead_letter_record(spec.name, stored.body, stored.headers)
            for spec in self.registry.queues
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
            "broker_restarts": stats.restarts,
            "returned_on_restart": stats.returned_on_restart,
            "processed": sum(p.processed for p in processors.values()),
            "duplicates_skipped": sum(p.duplicates for p in processors.values()),
        }
        breakers = {
            name: breaker_report(breaker, self.transitions, VirtualClock().now(), self.gateway)
            for name, breaker in self.registry.breakers.items()
        }
        history_counts = await read_history_counts(engine)
        reached = coverage.observed(
            history_counts, counters, breakers, self.operator_counts["commands_replayed"], self.faults.injected
        )
        reached |= app_goals
        operator = None
        if self.options.operator_after is not None:
            operator = {
                key: self.operator_counts[key] for key in ("compensations_retried", "dead_letters_replayed", "commands_replayed")
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
            breakers=breakers,
            coverage=reached,
            liveness=(
                {"heal_at_seconds": round((self.heal_at - self.origin).total_seconds(), 6), "bound_seconds": self.bound}
                if self.heal_at is not None and self.bound is not None
                else None
            ),
            operator=operator,
            trace=self.trace or [],
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
