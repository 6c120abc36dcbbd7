"""A circuit breaker on the payment gateway port: the state machine and the gateway wrapper.

`CircuitBreaker` is pure: it takes the time from the clock it is given and does no I/O.
It is *closed* until `failures` transient failures come in a row, then *open*: calls
fail fast with `CircuitOpenError` (a `TransientError`, so the message goes through the
delay queues) and the gateway is not called. Once `cool_down` has passed, the next call
finds it *half-open* and goes through alone, as a probe: its success closes the circuit,
its transient failure opens it again. Only a `TransientError` counts as a failure; an
answer, a decline included, is a success. Every transition is handed to the listeners
(`subscribe`): the log, the database record `compensa health` reads, metrics.

`BreakerGateway` implements the `PaymentGateway` port round another one, through a
breaker. Authorizations and refunds share it: they go to the same gateway, and a
gateway that is down refuses both.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, TypeVar

import structlog

from consumers.payments.gateway import Authorization, Decline, PaymentGateway
from contracts import Deferred, Money, TransientError
from contracts.clock import Clock

log = structlog.get_logger("compensa.payments")

T = TypeVar("T")

#: The circuit of the payment gateway: how logs, the database and metrics name it.
PAYMENT_GATEWAY = "payment_gateway"


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitOpenError(Deferred):
    """The circuit is open: the call was refused without reaching the gateway.

    A `Deferred`: the message is retried once the next probe may go, without using an attempt.
    """

    reason_class = "circuit_open"


@dataclass(frozen=True, slots=True)
class Transition:
    """One change of a breaker's state, as the listeners receive it."""

    circuit: str
    old: BreakerState
    new: BreakerState
    reason: str
    at: datetime
    #: Transient failures in a row when it happened (0 on closing).
    failures: int


@dataclass(frozen=True, slots=True)
class Permit:
    """Leave to make one call; its outcome is reported with it."""

    generation: int
    probe: bool


Listener = Callable[[Transition], None]


class CircuitBreaker:
    """Closed → open after `failures` transient failures in a row; open → half-open after `cool_down`; one probe decides.

    Outcomes of calls let through before the last transition (a call admitted while
    closed that ends after the circuit opened) are ignored: they say nothing about the
    gateway since. A probe that has not reported within `cool_down` (a call that hangs)
    no longer blocks the next one.
    """

    def __init__(self, name: str, *, failures: int, cool_down: timedelta, clock: Clock) -> None:
        if failures < 1:
            raise ValueError(f"failures must be at least 1, not {failures}")
        if cool_down <= timedelta(0):
            raise ValueError(f"cool_down must be positive, not {cool_down}")
        self.name = name
        self.threshold = failures
        self.cool_down = cool_down
        self.clock = clock
        self.state = BreakerState.CLOSED
        #: When the current state began (None: closed since it was built).
        self.since: datetime | None = None
        #: Transient failures in a row (the run that opened it, while open or half-open).
        self.failures = 0
        #: Calls refused without reaching the gateway.
        self.rejected = 0
        self._generation = 0
        self._probe_started: datetime | None = None
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        """Call `listener` with every transition from now on."""
        self._listeners.append(listener)

    def acquire(self) -> Permit:
        """Let one call through, or raise CircuitOpenError."""
        now = self.clock.now()
        if self.state is BreakerState.OPEN:
            assert self.since is not None
            if now < self.since + self.cool_down:
                self.rejected += 1
                raise CircuitOpenError(
                    f"{self.name.replace('_', ' ')} circuit open since {self.since.isoformat()} "
                    f"after {self.failures} transient failures in a row; next probe from "
                    f"{(self.since + self.cool_down).isoformat()}",
                    retry_after_seconds=(self.since + self.cool_down - now).total_seconds(),
                )
            self._move(BreakerState.HALF_OPEN, f"cool-down of {self.cool_down.total_seconds():g}s passed", now)
        if self.state is BreakerState.HALF_OPEN:
            if self._probe_started is not None and now < self._probe_started + self.cool_down:
                self.rejected += 1
                raise CircuitOpenError(
                    f"{self.name.replace('_', ' ')} circuit half-open: a probe is in flight",
                    retry_after_seconds=(self._probe_started + self.cool_down - now).total_seconds(),
                )
            self._probe_started = now
            return Permit(self._generation, probe=True)
        return Permit(self._generation, probe=False)

    def succeeded(self, permit: Permit) -> None:
        """The call answered (a decline is an answer)."""
        if permit.generation != self._generation:
            return
        if self.state is BreakerState.HALF_OPEN:
            self.failures = 0
            self._move(BreakerState.CLOSED, "probe succeeded", self.clock.now())
        else:
            self.failures = 0

    def failed(self, permit: Permit, error: str) -> None:
        """The call failed transiently (`error` says how)."""
        if permit.generation != self._generation:
            return
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN:
            self._move(BreakerState.OPEN, f"probe failed: {error}", self.clock.now())
        elif self.failures >= self.threshold:
            self._move(BreakerState.OPEN, f"{self.failures} transient failures in a row, the last: {error}", self.clock.now())

    def released(self, permit: Permit) -> None:
        """The call ended without a verdict on the gateway (cancelled, or a bug): free its probe slot."""
        if permit.generation == self._generation and permit.probe:
            self._probe_started = None

    def _move(self, new: BreakerState, reason: str, at: datetime) -> None:
        transition = Transition(self.name, self.state, new, reason, at, self.failures)
        self.state = new
        self.since = at
        self._generation += 1
        self._probe_started = None
        for listener in self._listeners:
            try:
                listener(transition)
            except Exception as exc:  # noqa: BLE001 - a failing listener (metrics, say) must not fail the payment
                log.error("circuit_breaker.listener_failed", circuit=self.name, listener=repr(listener), error=repr(exc))


_EVENTS = {
    BreakerState.OPEN: ("circuit_breaker.opened", "warning"),
    BreakerState.HALF_OPEN: ("circuit_breaker.half_opened", "info"),
    BreakerState.CLOSED: ("circuit_breaker.closed", "info"),
}


def log_transition(transition: Transition) -> None:
    """Log one transition: `circuit_breaker.opened` (a warning), `.half_opened`, `.closed`."""
    event, level = _EVENTS[transition.new]
    bound = log.bind(circuit=transition.circuit)
    fields: dict[str, Any] = {
        "previous": transition.old.value,
        "reason": transition.reason,
        "failures": transition.failures,
        "at": transition.at.isoformat(),
    }
    getattr(bound, level)(event, **fields)


class BreakerGateway:
    """A `PaymentGateway` that calls `inner` through `breaker`, and logs the breaker's transitions."""

    def __init__(self, inner: PaymentGateway, breaker: CircuitBreaker) -> None:
        self.inner = inner
        self.breaker = breaker
        breaker.subscribe(log_transition)

    async def authorize(self, order_id: str, amount: Money, token: str) -> Authorization | Decline:
        return await self._call(lambda: self.inner.authorize(order_id, amount, token))

    async def refund(self, payment_id: str, amount: Money) -> None:
        await self._call(lambda: self.inner.refund(payment_id, amount))

    async def _call(self, call: Callable[[], Awaitable[T]]) -> T:
        permit = self.breaker.acquire()
        try:
            result = await call()
        except TransientError as exc:
            self.breaker.failed(permit, str(exc) or type(exc).__name__)
            raise
        except BaseException:
            self.breaker.released(permit)
            raise
        self.breaker.succeeded(permit)
        return result
