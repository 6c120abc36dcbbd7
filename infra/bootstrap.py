"""The composition root: wire every service from the settings it is given.

``bootstrap(settings)`` returns a `Registry`: per consuming service its queues, its
handlers and how they are batched and admitted. Importing this module reads nothing
from the environment; entry points read the settings and call it. Faults are wired in
here too, never patched in later: `wrap_handlers`, `wrap_publisher` and `wrap_gateway`
decide what the registry hands out (see infra/simulation/faults.py).

The payment gateway is guarded by a circuit breaker (consumers/payments/breaker.py)
unless the settings turn it off; `Registry.breakers` holds it by circuit name, for
listeners (metrics, the simulator's report) to subscribe to.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

import consumers.payments as payments
from consumers.payments.breaker import PAYMENT_GATEWAY, BreakerGateway, CircuitBreaker
from consumers.payments.gateway import PaymentGateway
from contracts.clock import Clock
from infra import topology as t
from infra.apps import ORDER_APP, app_queues
from infra.clock import SystemClock
from infra.pipeline import BatchLock, MessageProcessor, RetryPolicy
from infra.settings import Settings
from infra.telemetry import instruments
from infra.telemetry.gateway_metrics import STATE_VALUES, MeasuredGateway, record_circuit_transition
from outbox.ports import Publisher
from outbox.tables import SERVICES as OUTBOX_TABLES
from outbox.uow import Handler, UnitOfWork
from sagas.app import SagaApp
from sagas.orchestrator import Orchestrator, TransitionObserver
from sagas.order_saga import order_saga

#: Replaces a service's handlers (service name, handlers by message type) when it is built.
WrapHandlers = Callable[[str, Mapping[str, Handler]], Mapping[str, Handler]]
#: Replaces the publisher the relays hand their batches to.
WrapPublisher = Callable[[Publisher], Publisher]
#: Replaces the payment gateway (inside the circuit breaker, which guards what it returns).
WrapGateway = Callable[[PaymentGateway], PaymentGateway]


class Parts:
    """What participants' handlers are built from besides the settings (`Participant.handlers`).

    The payment gateway (and its circuit breaker) is built the first time a participant
    asks for it, so an app without payments has no breaker.
    """

    def __init__(
        self,
        settings: Settings,
        orchestrator: Orchestrator,
        clock: Clock,
        *,
        wrap_gateway: WrapGateway | None = None,
        record_breakers: bool = True,
    ) -> None:
        self.settings = settings
        self.orchestrator = orchestrator
        self.clock = clock
        self._wrap_gateway = wrap_gateway
        self._record_breakers = record_breakers
        self._gateway: PaymentGateway | None = None
        self.breakers: dict[str, CircuitBreaker] = {}

    @property
    def gateway(self) -> PaymentGateway:
        if self._gateway is None:
            self._gateway, breaker = payment_gateway(
                self.settings, self.clock, wrap=self._wrap_gateway, record_breakers=self._record_breakers
            )
            if breaker is not None:
                self.breakers[breaker.name] = breaker
        return self._gateway


@dataclass(frozen=True)
class _Wiring:
    """How one consuming service is put together; its name is its queue's."""

    queue: t.QueueSpec
    handlers: Callable[[Parts], Mapping[str, Handler]]
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


def _wiring(app: SagaApp) -> tuple[_Wiring, ...]:
    """Every consuming service of `app`, in the order they are listed and started: the saga service first."""
    queues = {queue.name: queue for queue in app_queues(app)}
    saga = _Wiring(
        queues[app.saga_events_queue],
        lambda parts: parts.orchestrator.handlers(),
        starts=queues[app.saga_starts_queue],
    )
    participants = tuple(
        _Wiring(
            queues[participant.queue],
            participant.handlers_from,
            serial_batches=participant.serial_batches,
            lock_batch=participant.lock_batch,
        )
        for participant in app.participants
    )
    return (saga, *participants)


#: Every consuming service of the order app (the default).
_WIRING: tuple[_Wiring, ...] = _wiring(ORDER_APP)

#: The services that consume one work queue each through the consumer pipeline.
MESSAGE_SERVICES: tuple[str, ...] = tuple(wiring.queue.service for wiring in _WIRING)
#: The dead-letter archive (infra/dlq): it reads every `<queue>.dlq`, not one work queue.
ARCHIVE_SERVICE: str = t.DEAD_LETTER_QUEUES[0].service
#: What `compensa run` starts by default: every message service and the archive.
RUNNABLE_SERVICES: tuple[str, ...] = (*MESSAGE_SERVICES, ARCHIVE_SERVICE)
#: Services whose outboxes a relay drains; `ingest` carries events accepted over HTTP.
OUTBOX_SERVICES: tuple[str, ...] = OUTBOX_TABLES


def message_services(app: SagaApp) -> tuple[str, ...]:
    """The services of `app` that consume a work queue: the saga service and its participants."""
    return ("saga", *(participant.name for participant in app.participants))


def outbox_services(app: SagaApp) -> tuple[str, ...]:
    """The outboxes a process hosting `app` relays: compensa's own, then its participants'."""
    return (*OUTBOX_SERVICES, *(name for name in message_services(app) if name not in OUTBOX_SERVICES))


def outboxes_of(services: Sequence[str], app: SagaApp = ORDER_APP) -> tuple[str, ...]:
    """The outboxes a process running `services` owns: theirs, or every one when it runs them all."""
    every = outbox_services(app)
    if set(services) >= set(message_services(app)):
        return every
    return tuple(name for name in services if name in every)


def orchestrator_for(settings: Settings, observers: Sequence[TransitionObserver] = (), app: SagaApp = ORDER_APP) -> Orchestrator:
    """The orchestrator of `app`'s sagas (and `observers` of its transitions).

    The order saga takes its timings from the settings (COMPENSA_SAGA_*); another app's
    sagas keep the deadlines their definitions give.
    """
    if app is not ORDER_APP:
        return Orchestrator(list(app.sagas), observers)
    return Orchestrator(
        [
            order_saga(
                step_deadline=timedelta(seconds=settings.saga_step_deadline_seconds),
                compensation_deadline=timedelta(seconds=settings.saga_compensation_deadline_seconds),
                max_compensation_attempts=settings.saga_max_compensation_attempts,
            )
        ],
        observers,
    )


@dataclass(frozen=True)
class Service:
    """One consuming service as built: its queues, its handlers, how deliveries reach them."""

    name: str
    queue: t.QueueSpec
    handlers: Mapping[str, Handler]
    #: Deliveries applied in one transaction when they arrive together (1: one at a time).
    batch_size: int
    #: Batches in flight at once in one process.
    workers: int
    lock_batch: BatchLock | None = None
    #: The queue of messages that start new work, and how many may be in flight at once.
    starts: t.QueueSpec | None = None
    max_in_flight: int | None = None


@dataclass(frozen=True)
class Registry:
    """The wired system: what `bootstrap` returns and entry points run."""

    settings: Settings
    orchestrator: Orchestrator
    services: Mapping[str, Service]
    wrap_publisher: WrapPublisher | None = None
    #: Circuit breakers by circuit name (the payment gateway's, unless turned off).
    breakers: Mapping[str, CircuitBreaker] = field(default_factory=dict)
    #: The saga application these services host.
    app: SagaApp = ORDER_APP

    @property
    def queues(self) -> tuple[t.QueueSpec, ...]:
        """The app's work queues, in topology order."""
        return app_queues(self.app)

    @property
    def retry(self) -> RetryPolicy:
        settings = self.settings
        return RetryPolicy(
            settings.max_attempts,
            settings.retry_base_seconds,
            settings.retry_max_seconds,
            unavailable_seconds=settings.unavailable_retry_seconds,
        )

    def processor(
        self,
        name: str,
        engine: AsyncEngine,
        clock: Clock,
        *,
        rng: random.Random | None = None,
        uow_factory: Callable[..., UnitOfWork] = UnitOfWork,
    ) -> MessageProcessor:
        """The consumer pipeline for service `name`, over its handlers."""
        service = self.services[name]
        return MessageProcessor(
            engine,
            service.name,
            service.queue.name,
            service.handlers,
            clock,
            retry=self.retry,
            rng=rng,
            uow_factory=uow_factory,
            lock_batch=service.lock_batch,
        )

    def publisher(self, transport: Publisher) -> Publisher:
        """What the relays publish through: the transport, wrapped if a hook asked for it."""
        return self.wrap_publisher(transport) if self.wrap_publisher is not None else transport


def payment_gateway(
    settings: Settings,
    clock: Clock,
    *,
    wrap: WrapGateway | None = None,
    record_breakers: bool = True,
) -> tuple[PaymentGateway, CircuitBreaker | None]:
    """The gateway payments calls, and the breaker guarding it (None when the settings turn it off).

    The deterministic gateway, wrapped by `wrap` (faults), behind a circuit breaker timed
    by `clock`. With `record_breakers` the breaker's transitions are written to the
    database of the settings, where `compensa health` reads them.
    """
    gateway: PaymentGateway = payments.RuleBasedGateway(limit=settings.payment_amount_limit)
    if wrap is not None:
        gateway = wrap(gateway)
    if not settings.payment_breaker_enabled:
        return MeasuredGateway(gateway), None
    breaker = CircuitBreaker(
        PAYMENT_GATEWAY,
        failures=settings.payment_breaker_failures,
        cool_down=timedelta(seconds=settings.payment_breaker_cool_down_seconds),
        clock=clock,
    )
    breaker.subscribe(record_circuit_transition)
    instruments.circuit_state.set(STATE_VALUES[breaker.state], {"circuit": breaker.name})
    if record_breakers:
        from infra.circuit_breakers import BreakerRecorder

        breaker.subscribe(BreakerRecorder(settings.database_url, clock))
    # Measured outside the breaker, so its refusals count as `rejected` calls.
    return MeasuredGateway(BreakerGateway(gateway, breaker)), breaker


def bootstrap(
    settings: Settings,
    *,
    orchestrator: Orchestrator | None = None,
    wrap_handlers: WrapHandlers | None = None,
    wrap_publisher: WrapPublisher | None = None,
    wrap_gateway: WrapGateway | None = None,
    clock: Clock | None = None,
    record_breakers: bool = True,
    app: SagaApp = ORDER_APP,
) -> Registry:
    """Build every consuming service of `app` (the order app by default) from `settings`.

    `orchestrator` replaces the app's sagas as the settings time them; `wrap_handlers`
    gets each service's handlers as they are built and returns the ones it will run;
    `wrap_publisher` wraps the publisher the relays are given; `wrap_gateway` wraps the
    payment gateway inside its circuit breaker. `clock` times the breaker's cool-down
    (the system clock by default; the simulator's virtual one there), and
    `record_breakers=False` keeps its transitions out of the database.
    """
    orchestrator = orchestrator or orchestrator_for(settings, app=app)
    parts = Parts(settings, orchestrator, clock or SystemClock(), wrap_gateway=wrap_gateway, record_breakers=record_breakers)
    services = {}
    for wiring in _WIRING if app is ORDER_APP else _wiring(app):
        name = wiring.queue.service
        handlers = wiring.handlers(parts)
        if wrap_handlers is not None:
            handlers = wrap_handlers(name, handlers)
        services[name] = Service(
            name,
            wiring.queue,
            dict(handlers),
            batch_size=settings.consumer_batch_size,
            workers=1 if wiring.serial_batches else settings.consumer_workers,
            lock_batch=wiring.lock_batch,
            starts=wiring.starts,
            max_in_flight=settings.saga_max_in_flight if wiring.starts is not None else None,
        )
    return Registry(settings, orchestrator, services, wrap_publisher, parts.breakers, app)
