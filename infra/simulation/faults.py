"""The fault injector: seeded draws, handler and publisher wrappers, for both kinds of run.

Faults are injected around the real code, never inside it, and never by patching a
live object: `FaultInjector.wrap_handlers` and `FaultInjector.publisher` are the hooks
`infra.bootstrap.bootstrap` applies when it builds the services, so what the registry
hands out is already faulty (`FaultInjector.gateway` likewise wraps the payment
gateway, inside its circuit breaker). The simulated run (driver.py) also draws its delivery
faults (reordering, delay, silence, duplicates, lost acks) from `chance`, so one rng
decides everything in a fixed order and a seed replays the run.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.exc import OperationalError

from consumers.payments.gateway import Authorization, Decline, PaymentGateway
from contracts import BusinessRuleError, Money, TransientError
from contracts.clock import Clock
from outbox.ports import OutgoingMessage, Publisher
from outbox.uow import Handler, UnitOfWork
from sagas.simulation.faults import BURST_RATE, BURSTING, FaultRates

#: Participants whose handlers the injector may break (the saga copes with them).
FAULTY_SERVICES = ("stock", "payments")


class RelayCrash(Exception):
    """Injected: the relay died after the broker confirmed, before it marked the rows sent."""


class FaultInjector:
    """Draw faults at `rates` from `rng`, counting what was injected.

    `duplicate_publishes` sends a message twice at publish time (the real stack, whose
    broker cannot be told to redeliver); the simulator duplicates at delivery instead.
    """

    #: The services whose handlers it breaks (an app's own participants, `--app`).
    faulty_services: tuple[str, ...] = FAULTY_SERVICES

    def __init__(
        self,
        rates: FaultRates,
        rng: random.Random,
        *,
        duplicate_publishes: bool = False,
        clock: Clock | None = None,
        stop_at: datetime | None = None,
    ) -> None:
        self.rates = rates
        self.rng = rng
        self.duplicate_publishes = duplicate_publishes
        self.injected: Counter[str] = Counter()
        #: From `stop_at` on (by `clock`) no fault strikes: the world heals (a liveness run).
        self.clock = clock
        self.stop_at = stop_at
        #: fault -> when its burst ends (`burst`; needs the clock).
        self.bursts: dict[str, datetime] = {}

    @property
    def stopped(self) -> bool:
        """Whether the faults have stopped (always False without a `stop_at`)."""
        return self.stop_at is not None and self.clock is not None and self.clock.now() >= self.stop_at

    def chance(self, fault: str) -> bool:
        """Whether `fault` strikes now; a fault at rate 0, or after the faults stopped, draws nothing.

        During a burst of its kind a fault strikes at `BURST_RATE`; a strike outside one
        may start one, at the `burst` rate.
        """
        rate: float = getattr(self.rates, fault)
        if rate <= 0 or self.stopped:
            return False
        bursting = self._bursting(fault)
        hit = self.rng.random() < (max(rate, BURST_RATE) if bursting else rate)
        if hit:
            self.injected[fault] += 1
            if not bursting and fault in BURSTING and self.clock is not None and self.chance("burst"):
                self.bursts[fault] = self.clock.now() + timedelta(seconds=self.rates.burst_seconds)
        return hit

    def _bursting(self, fault: str) -> bool:
        until = self.bursts.get(fault)
        if until is None or self.clock is None:
            return False
        if self.clock.now() < until:
            return True
        del self.bursts[fault]
        return False

    def outcome(self, fault: str, outcome: str) -> bool:
        """Draw one of a fault's two outcomes, evenly, counted as `fault_outcome` when it is True."""
        hit = self.rng.random() < 0.5
        if hit:
            self.injected[f"{fault}_{outcome}"] += 1
        return hit

    def wrap_handlers(self, service: str, handlers: Mapping[str, Handler]) -> Mapping[str, Handler]:
        """The bootstrap hook: participants' handlers fail before doing anything, at the error rates."""
        if service not in self.faulty_services:
            return handlers
        return {message_type: self._faulty(handler) for message_type, handler in handlers.items()}

    def _faulty(self, handler: Handler) -> Handler:
        async def handle(uow: UnitOfWork, message: Any) -> None:
            if self.chance("transient_error"):
                raise TransientError("injected transient participant error")
            if self.chance("permanent_error"):
                raise BusinessRuleError("injected permanent participant error")
            await handler(uow, message)

        return handle

    def publisher(self, inner: Publisher) -> Publisher:
        """The bootstrap hook: the relays' publisher, duplicating and crashing at its rates."""
        return FaultyPublisher(inner, self)

    def units_of_work(self, factory: Callable[..., UnitOfWork]) -> Callable[..., UnitOfWork]:
        """The consumers' unit of work, over an engine whose commits may end unknown (`commit_unknown`)."""
        if self.rates.commit_unknown <= 0:
            return factory

        def build(engine: Any, *args: Any, **kwargs: Any) -> UnitOfWork:
            return factory(UncertainCommits(engine, self), *args, **kwargs)

        return build

    def gateway(self, inner: PaymentGateway, clock: Clock) -> GatewayOutages:
        """The payment gateway, down for `gateway_outage_seconds` of `clock` time when an outage strikes."""
        return GatewayOutages(inner, self, clock)


class GatewayOutages:
    """A payment gateway that has outages: while one lasts, every call fails transiently.

    Each call made while the gateway is up may start an outage, at the `gateway_outage`
    rate; it lasts `gateway_outage_seconds` by the clock, then the gateway answers again.
    """

    def __init__(self, inner: PaymentGateway, faults: FaultInjector, clock: Clock) -> None:
        self.inner = inner
        self.faults = faults
        self.clock = clock
        self.down_until: datetime | None = None
        #: Calls that reached the gateway, and those of them that failed in an outage.
        self.calls = 0
        self.failed = 0

    def _check(self) -> None:
        self.calls += 1
        now = self.clock.now()
        if self.faults.stopped:
            # The world healed: an outage in progress ends with it.
            self.down_until = None
            return
        if self.down_until is None or now >= self.down_until:
            if not self.faults.chance("gateway_outage"):
                return
            self.down_until = now + timedelta(seconds=self.faults.rates.gateway_outage_seconds)
        self.failed += 1
        raise TransientError(f"injected: payment gateway outage until {self.down_until.isoformat()}")

    async def authorize(self, order_id: str, amount: Money, token: str) -> Authorization | Decline:
        self._check()
        return await self.inner.authorize(order_id, amount, token)

    async def refund(self, payment_id: str, amount: Money) -> None:
        self._check()
        await self.inner.refund(payment_id, amount)


class UncertainCommits:
    """An engine whose connections may drop during COMMIT, leaving its outcome unknown.

    The COMMIT reached the database: half the time it was durable, half the time the
    server rolled back. Either way the client sees its connection invalidated, as a
    driver reports a server lost mid-commit, and the pipeline reruns the message on a
    new connection, where the inbox tells the two outcomes apart.
    """

    def __init__(self, inner: Any, faults: FaultInjector) -> None:
        self.inner = inner
        self.faults = faults

    async def connect(self) -> UncertainConnection:
        return UncertainConnection(await self.inner.connect(), self.faults)


class UncertainConnection:
    """A connection of `UncertainCommits`: the inner one, with a commit that may end unknown."""

    def __init__(self, inner: Any, faults: FaultInjector) -> None:
        self.inner = inner
        self.faults = faults

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def commit(self) -> None:
        if not self.faults.chance("commit_unknown"):
            await self.inner.commit()
            return
        if self.faults.outcome("commit_unknown", "durable"):
            await self.inner.commit()
        else:
            await self.inner.rollback()
        lost = ConnectionResetError("injected: connection lost during COMMIT")
        raise OperationalError("COMMIT", None, lost, connection_invalidated=True)


class FaultyPublisher:
    """Publish through `inner`; maybe twice; maybe die after the broker confirmed."""

    def __init__(self, inner: Publisher, faults: FaultInjector) -> None:
        self.inner = inner
        self.faults = faults

    async def publish_batch(self, messages: Sequence[OutgoingMessage]) -> None:
        batch: list[OutgoingMessage] = []
        for message in messages:
            batch.append(message)
            if self.faults.duplicate_publishes and self.faults.chance("duplicate"):
                # Right behind the original, so each saga's order is kept.
                batch.append(message)
        await self.inner.publish_batch(batch)
        if self.faults.chance("relay_crash"):
            raise RelayCrash("injected: relay died after the broker confirmed")
