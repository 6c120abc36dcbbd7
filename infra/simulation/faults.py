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
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from consumers.payments.gateway import Authorization, Decline, PaymentGateway
from contracts import BusinessRuleError, Money, TransientError
from contracts.clock import Clock
from outbox.ports import OutgoingMessage, Publisher
from outbox.uow import Handler, UnitOfWork
from sagas.simulation.faults import FaultRates

#: Participants whose handlers the injector may break (the saga copes with them).
FAULTY_SERVICES = ("stock", "payments")


class RelayCrash(Exception):
    """Injected: the relay died after the broker confirmed, before it marked the rows sent."""


class FaultInjector:
    """Draw faults at `rates` from `rng`, counting what was injected.

    `duplicate_publishes` sends a message twice at publish time (the real stack, whose
    broker cannot be told to redeliver); the simulator duplicates at delivery instead.
    """

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

    @property
    def stopped(self) -> bool:
        """Whether the faults have stopped (always False without a `stop_at`)."""
        return self.stop_at is not None and self.clock is not None and self.clock.now() >= self.stop_at

    def chance(self, fault: str) -> bool:
        """Whether `fault` strikes now; a fault at rate 0, or after the faults stopped, draws nothing."""
        rate: float = getattr(self.rates, fault)
        if rate <= 0 or self.stopped:
            return False
        hit = self.rng.random() < rate
        if hit:
            self.injected[fault] += 1
        return hit

    def wrap_handlers(self, service: str, handlers: Mapping[str, Handler]) -> Mapping[str, Handler]:
        """The bootstrap hook: participants' handlers fail before doing anything, at the error rates."""
        if service not in FAULTY_SERVICES:
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
