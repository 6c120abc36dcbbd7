"""Composition root: which queue feeds which service's handlers, and the running of them."""

from __future__ import annotations

import asyncio
import random
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import structlog
from opentelemetry import trace
from sqlalchemy.ext.asyncio import AsyncEngine

import consumers.ledger as ledger
import consumers.orders as orders
import consumers.payments as payments
import consumers.stock as stock
from contracts.clock import Clock
from infra import topology as t
from infra.pipeline import AdmissionGate, BatchingConsumer, BatchLock, Handler, MessageProcessor, RetryPolicy
from infra.settings import Settings
from infra.transport.base import Subscription, Transport
from outbox.relay import Relay
from outbox.uow import UnitOfWork, prune
from sagas import ORDER_SAGA
from sagas.order_saga import order_saga
from sagas.orchestrator import Orchestrator
from sagas.store import SagaStore, count_in_flight

log = structlog.get_logger("compensa.runtime")
tracer = trace.get_tracer("compensa")

ORCHESTRATOR = Orchestrator([ORDER_SAGA])


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    queue: t.QueueSpec
    handlers: Callable[[], Mapping[str, Handler]]
    #: One batch in flight per process: its handlers lock rows that many messages share
    #: (stock's SKU counters, the ledger's balances) in per-message order, so two batches
    #: at once take them in different orders and deadlock (measured: hundreds of
    #: deadlocks, each stalling a second, with 8 hot SKUs and 4 workers).
    serial_batches: bool = False
    #: Takes a batch's locks up front in one order, so batches of two processes queue
    #: instead of deadlocking (serial_batches only orders the batches of one process).
    lock_batch: BatchLock | None = None
    #: A second queue, of messages that start new work, consumed by the same handlers
    #: behind an admission gate (`Settings.saga_max_in_flight`).
    starts: t.QueueSpec | None = None


def orchestrator_for(settings: Settings) -> Orchestrator:
    """The orchestrator with the saga timings the settings ask for."""
    return Orchestrator(
        [
            order_saga(
                step_deadline=timedelta(seconds=settings.saga_step_deadline_seconds),
                compensation_deadline=timedelta(seconds=settings.saga_compensation_deadline_seconds),
                max_compensation_attempts=settings.saga_max_compensation_attempts,
            )
        ]
    )


def build_services(settings: Settings, orchestrator: Orchestrator | None = None) -> dict[str, ServiceSpec]:
    """Every consuming service, its queue and its handlers, configured by the settings."""
    orchestrator = orchestrator or orchestrator_for(settings)
    gateway = payments.RuleBasedGateway(limit=settings.payment_amount_limit)
    ttl = timedelta(seconds=settings.reservation_ttl_seconds)
    return {
        "saga": ServiceSpec("saga", t.SAGA_EVENTS, orchestrator.handlers, starts=t.SAGA_STARTS),
        "stock": ServiceSpec(
            "stock",
            t.STOCK_COMMANDS,
            lambda: stock.make_handlers(reservation_ttl=ttl),
            serial_batches=True,
            lock_batch=stock.lock_batch,
        ),
        "payments": ServiceSpec("payments", t.PAYMENTS_COMMANDS, lambda: payments.make_handlers(gateway)),
        "ledger": ServiceSpec(
            "ledger", t.LEDGER_EVENTS, lambda: ledger.HANDLERS, serial_batches=True, lock_batch=ledger.lock_batch
        ),
        "orders": ServiceSpec("orders", t.ORDERS_EVENTS, lambda: orders.HANDLERS),
    }


SERVICES: dict[str, ServiceSpec] = build_services(Settings())

#: The dead-letter archive (infra/dlq): it reads every `<queue>.dlq`, not one work queue.
ARCHIVE_SERVICE = "dlq"
#: What `compensa run` starts by default: every message service and the archive.
RUNNABLE_SERVICES: tuple[str, ...] = (*SERVICES, ARCHIVE_SERVICE)

# Services whose outboxes a relay drains; `ingest` carries events accepted over HTTP.
OUTBOX_SERVICES = ("orders", "stock", "payments", "ledger", "saga", "ingest", "dlq")


def retry_policy(settings: Settings) -> RetryPolicy:
    return RetryPolicy(
        settings.max_attempts,
        settings.retry_base_seconds,
        settings.retry_max_seconds,
        unavailable_seconds=settings.unavailable_retry_seconds,
    )


def make_processor(
    spec: ServiceSpec,
    engine: AsyncEngine,
    clock: Clock,
    settings: Settings,
    *,
    handlers: Mapping[str, Handler] | None = None,
    rng: random.Random | None = None,
    uow_factory: Callable[..., UnitOfWork] = UnitOfWork,
) -> MessageProcessor:
    return MessageProcessor(
        engine,
        spec.name,
        spec.queue.name,
        handlers if handlers is not None else spec.handlers(),
        clock,
        retry=retry_policy(settings),
        rng=rng,
        uow_factory=uow_factory,
        lock_batch=spec.lock_batch,
    )


async def sweep_deadlines(
    engine: AsyncEngine,
    clock: Clock,
    *,
    orchestrator: Orchestrator = ORCHESTRATOR,
    limit: int = 100,
    uow_factory: Callable[..., UnitOfWork] = UnitOfWork,
) -> int:
    """Fire every due saga deadline in one transaction; return how many fired."""
    with tracer.start_as_current_span("saga.sweep_deadlines"):
        async with uow_factory(engine, "saga", clock) as uow:
            due = await SagaStore(uow.connection).due_deadlines(clock.now(), limit)
            for saga_id, deadline in due:
                with structlog.contextvars.bound_contextvars(saga_id=saga_id):
                    await orchestrator.fire_deadline(uow, saga_id, deadline)
            await uow.commit()
    return len(due)


@dataclass
class Runtime:
    """Run consumers, relays and background sweepers for a set of services until stopped."""

    engine: AsyncEngine
    transport: Transport
    clock: Clock
    settings: Settings
    services: Sequence[str]
    relays: bool = True
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    processors: dict[str, MessageProcessor] = field(default_factory=dict)
    orchestrator: Orchestrator | None = None
    relay_objects: list[Relay] = field(default_factory=list)
    archive: Any = None
    #: Admits saga starts while fewer than `saga_max_in_flight` sagas run (saga service only).
    gate: AdmissionGate | None = None
    _subscriptions: list[Subscription] = field(default_factory=list)
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    _batchers: list[BatchingConsumer] = field(default_factory=list)

    async def start(self) -> None:
        if self.settings.declare_topology:
            await self.transport.declare_topology()
        self.orchestrator = self.orchestrator or orchestrator_for(self.settings)
        specs = build_services(self.settings, self.orchestrator)
        for name in self.services:
            if name == ARCHIVE_SERVICE:
                from infra.dlq.archive import start_archive

                self.archive, subscriptions = await start_archive(self.transport, self.engine, self.clock, self.settings.prefetch)
                self._subscriptions.extend(subscriptions)
                continue
            spec = specs[name]
            processor = make_processor(spec, self.engine, self.clock, self.settings)
            self.processors[name] = processor
            handler: Any = processor
            if self.settings.consumer_batch_size > 1:
                handler = BatchingConsumer(
                    processor,
                    max_batch=self.settings.consumer_batch_size,
                    workers=1 if spec.serial_batches else self.settings.consumer_workers,
                )
                self._batchers.append(handler)
            self._subscriptions.append(
                await self.transport.consume(spec.queue, handler, self.settings.prefetch)
            )
            if spec.starts is not None:
                self.gate = AdmissionGate(self._count_sagas_in_flight, self.settings.saga_max_in_flight)
                self._subscriptions.append(
                    await self.transport.consume(spec.starts, self.gate.guard(handler), self.settings.prefetch)
                )
        if self.relays:
            for name in self._relayed_outboxes():
                relay = Relay(
                    self.engine,
                    name,
                    self.transport,
                    self.clock,
                    batch_size=self.settings.relay_batch_size,
                    poll_seconds=self.settings.relay_poll_seconds,
                )
                self.relay_objects.append(relay)
                self._tasks.append(asyncio.create_task(relay.run(self.stop_event), name=f"relay:{name}"))
            self._tasks.append(asyncio.create_task(self._notify_listener(), name="relay:listen"))
        if "saga" in self.services:
            self._tasks.append(asyncio.create_task(self._every(self.settings.deadline_sweep_seconds, self._sweep), name="deadlines"))
        if "stock" in self.services:
            self._tasks.append(asyncio.create_task(self._every(5.0, self._expire_reservations), name="reservations"))
        self._tasks.append(asyncio.create_task(self._every(300.0, self._prune), name="prune"))
        log.info("runtime.started", services=list(self.services), relays=self.relays)

    async def _count_sagas_in_flight(self) -> int:
        async with self.engine.connect() as connection:
            return await count_in_flight(connection)

    def _relayed_outboxes(self) -> list[str]:
        names = [s for s in self.services if s in OUTBOX_SERVICES]
        if set(self.services) >= set(SERVICES):
            names = list(OUTBOX_SERVICES)
        return names

    async def _sweep(self) -> None:
        assert self.orchestrator is not None
        while await sweep_deadlines(self.engine, self.clock, orchestrator=self.orchestrator) >= 100:
            pass

    async def _expire_reservations(self) -> None:
        await stock.expire_reservations(self.engine, self.clock)

    async def _prune(self) -> None:
        for name in self._relayed_outboxes():
            await prune(
                self.engine,
                name,
                now=self.clock.now(),
                outbox_age=timedelta(hours=self.settings.outbox_retention_hours),
                inbox_age=timedelta(hours=self.settings.inbox_retention_hours),
            )

    async def _every(self, seconds: float, job: Callable[[], Any]) -> None:
        while not self.stop_event.is_set():
            try:
                await job()
            except Exception as exc:  # noqa: BLE001 - a background job must survive outages; it is logged
                log.warning("runtime.job_failed", job=getattr(job, "__name__", str(job)), error=repr(exc))
            try:
                await asyncio.wait_for(self.stop_event.wait(), timeout=seconds)
            except TimeoutError:
                pass

    async def _notify_listener(self) -> None:
        """Wake relays on Postgres NOTIFY; polling covers SQLite and missed hints."""
        if self.engine.dialect.name != "postgresql":
            return
        from outbox.notify import listen_for_outbox

        await listen_for_outbox(self.engine, {r.service: r for r in self.relay_objects}, self.stop_event)

    async def stop(self) -> None:
        """Stop consuming, let in-flight handlers finish, flush relays, then return."""
        log.info("runtime.stopping")
        grace = self.settings.shutdown_grace_seconds
        await asyncio.gather(*(s.stop(grace) for s in self._subscriptions), return_exceptions=True)
        for batcher in self._batchers:
            batcher.close()
        self.stop_event.set()
        if self._tasks:
            done, pending = await asyncio.wait(self._tasks, timeout=grace)
            for task in pending:
                task.cancel()
        log.info("runtime.stopped")

    async def run_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_requested.set)
        await self.start()
        await stop_requested.wait()
        await self.stop()
