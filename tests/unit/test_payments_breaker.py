"""The payment gateway's circuit breaker: its state machine on a virtual clock, and the gateway wrapper."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from structlog.testing import capture_logs

from consumers.payments.breaker import (
    PAYMENT_GATEWAY,
    BreakerGateway,
    BreakerState,
    CircuitBreaker,
    CircuitOpenError,
    Transition,
)
from consumers.payments.gateway import Authorization, Decline, RuleBasedGateway
from contracts import Money, TransientError
from infra.bootstrap import bootstrap
from infra.clock import VirtualClock
from infra.settings import Settings
from infra.telemetry.gateway_metrics import MeasuredGateway

EUR = Money(amount=4_200, currency="EUR")
COOL_DOWN = timedelta(seconds=10)


def breaker(clock: VirtualClock, failures: int = 3) -> tuple[CircuitBreaker, list[Transition]]:
    """A breaker opening after `failures` in a row, and the transitions it reports."""
    seen: list[Transition] = []
    made = CircuitBreaker(PAYMENT_GATEWAY, failures=failures, cool_down=COOL_DOWN, clock=clock)
    made.subscribe(seen.append)
    return made, seen


def fail(b: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        b.failed(b.acquire(), "gateway unavailable")


def steps(seen: list[Transition]) -> list[tuple[str, str]]:
    return [(t.old.value, t.new.value) for t in seen]


class FlakyGateway(RuleBasedGateway):
    """The rule-based gateway, down while `down` is set; counts every call it receives."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.calls = 0
        self.error: BaseException | None = None

    async def authorize(self, order_id: str, amount: Money, token: str) -> Authorization | Decline:
        self.calls += 1
        if self.error is not None:
            raise self.error
        if self.down:
            raise TransientError("gateway timed out")
        return await super().authorize(order_id, amount, token)

    async def refund(self, payment_id: str, amount: Money) -> None:
        self.calls += 1
        if self.down:
            raise TransientError("gateway timed out")
        await super().refund(payment_id, amount)


# ---------------------------------------------------------------- the state machine


def test_a_run_of_transient_failures_opens_it_and_not_one_less() -> None:
    clock = VirtualClock()
    b, seen = breaker(clock, failures=3)

    fail(b, 2)
    assert b.state is BreakerState.CLOSED and seen == []
    fail(b, 1)

    assert b.state is BreakerState.OPEN
    assert b.since == clock.now() and b.failures == 3
    (opened,) = seen
    assert (opened.circuit, opened.old, opened.new, opened.at, opened.failures) == (
        PAYMENT_GATEWAY,
        BreakerState.CLOSED,
        BreakerState.OPEN,
        clock.now(),
        3,
    )
    assert opened.reason == "3 transient failures in a row, the last: gateway unavailable"


def test_a_success_breaks_the_run() -> None:
    b, seen = breaker(VirtualClock(), failures=3)

    fail(b, 2)
    b.succeeded(b.acquire())
    fail(b, 2)

    assert b.state is BreakerState.CLOSED and b.failures == 2 and seen == []


def test_open_refuses_until_the_cool_down_passes_then_lets_one_probe_through() -> None:
    clock = VirtualClock()
    b, seen = breaker(clock)
    fail(b, 3)
    opened_at = clock.now()

    clock.advance(9.999)
    with pytest.raises(CircuitOpenError, match="payment gateway circuit open since") as refused:
        b.acquire()
    assert isinstance(refused.value, TransientError)  # retried through the delay queues
    assert b.rejected == 1 and b.state is BreakerState.OPEN

    clock.advance(0.001)
    probe = b.acquire()
    assert probe.probe and b.state is BreakerState.HALF_OPEN and b.since == opened_at + COOL_DOWN
    with pytest.raises(CircuitOpenError, match="half-open: a probe is in flight"):
        b.acquire()
    assert b.rejected == 2
    assert steps(seen) == [("closed", "open"), ("open", "half_open")]
    assert seen[-1].reason == "cool-down of 10s passed"


def test_a_successful_probe_closes_it() -> None:
    clock = VirtualClock()
    b, seen = breaker(clock)
    fail(b, 3)
    clock.advance(10)

    b.succeeded(b.acquire())

    assert b.state is BreakerState.CLOSED and b.failures == 0
    assert steps(seen) == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    assert seen[-1].reason == "probe succeeded" and seen[-1].failures == 0
    assert not b.acquire().probe  # closed: every call goes through


def test_a_failed_probe_opens_it_again_for_a_whole_cool_down() -> None:
    clock = VirtualClock()
    b, seen = breaker(clock)
    fail(b, 3)
    clock.advance(10)

    b.failed(b.acquire(), "still down")

    assert b.state is BreakerState.OPEN and b.since == clock.now() and b.failures == 4
    assert seen[-1].reason == "probe failed: still down"
    clock.advance(9)
    with pytest.raises(CircuitOpenError):
        b.acquire()
    clock.advance(1)
    assert b.acquire().probe


def test_outcomes_of_calls_let_through_before_a_transition_are_ignored() -> None:
    clock = VirtualClock()
    b, seen = breaker(clock)
    slow = b.acquire()  # admitted while closed, answers after the circuit opened
    fail(b, 3)

    b.succeeded(slow)
    assert b.state is BreakerState.OPEN

    clock.advance(10)
    probe = b.acquire()
    b.failed(slow, "late failure")  # says nothing about the gateway now
    assert b.state is BreakerState.HALF_OPEN
    b.succeeded(probe)
    assert b.state is BreakerState.CLOSED
    assert len(seen) == 3


def test_a_probe_ending_without_a_verdict_frees_the_slot_and_counts_nothing() -> None:
    clock = VirtualClock()
    b, _seen = breaker(clock)
    fail(b, 3)
    clock.advance(10)

    b.released(b.acquire())

    assert b.state is BreakerState.HALF_OPEN and b.failures == 3
    assert b.acquire().probe  # the next call probes at once


def test_a_probe_that_never_answers_blocks_the_next_one_for_a_cool_down_only() -> None:
    clock = VirtualClock()
    b, _seen = breaker(clock)
    fail(b, 3)
    clock.advance(10)
    b.acquire()  # hangs

    clock.advance(9.5)
    with pytest.raises(CircuitOpenError):
        b.acquire()
    clock.advance(0.5)
    assert b.acquire().probe


def test_a_failing_listener_does_not_fail_the_call_or_silence_the_others() -> None:
    b, seen = breaker(VirtualClock(), failures=1)

    def broken(_transition: Transition) -> None:
        raise RuntimeError("metrics exporter down")

    b.subscribe(broken)
    later: list[Transition] = []
    b.subscribe(later.append)
    with capture_logs() as logs:
        fail(b, 1)

    assert b.state is BreakerState.OPEN and len(seen) == len(later) == 1
    assert [entry["event"] for entry in logs] == ["circuit_breaker.listener_failed"]


@pytest.mark.parametrize(("failures", "cool_down"), [(0, COOL_DOWN), (1, timedelta(0))])
def test_nonsense_limits_are_refused(failures: int, cool_down: timedelta) -> None:
    with pytest.raises(ValueError, match="must be"):
        CircuitBreaker(PAYMENT_GATEWAY, failures=failures, cool_down=cool_down, clock=VirtualClock())


# ---------------------------------------------------------------- the gateway wrapper


async def test_while_open_charges_fail_fast_without_calling_the_gateway() -> None:
    clock = VirtualClock()
    inner = FlakyGateway()
    gateway = BreakerGateway(inner, breaker(clock, failures=2)[0])
    inner.down = True

    for _ in range(2):
        with pytest.raises(TransientError, match="gateway timed out"):
            await gateway.authorize("o1", EUR, "tok_ok")
    for _ in range(5):
        with pytest.raises(CircuitOpenError):
            await gateway.authorize("o1", EUR, "tok_ok")

    assert inner.calls == 2
    inner.down = False
    clock.advance(10)
    assert isinstance(await gateway.authorize("o1", EUR, "tok_ok"), Authorization)
    assert gateway.breaker.state is BreakerState.CLOSED and inner.calls == 3


async def test_a_decline_is_an_answer_and_breaks_the_run() -> None:
    inner = FlakyGateway()
    gateway = BreakerGateway(inner, breaker(VirtualClock(), failures=2)[0])

    with pytest.raises(TransientError):
        await gateway.authorize("o1", EUR, "tok_unavailable")
    assert isinstance(await gateway.authorize("o2", EUR, "tok_decline"), Decline)
    with pytest.raises(TransientError):
        await gateway.authorize("o3", EUR, "tok_unavailable")

    assert gateway.breaker.state is BreakerState.CLOSED and gateway.breaker.failures == 1


async def test_refunds_share_the_breaker_with_charges() -> None:
    clock = VirtualClock()
    inner = FlakyGateway()
    gateway = BreakerGateway(inner, breaker(clock, failures=2)[0])
    inner.down = True
    for _ in range(2):
        with pytest.raises(TransientError):
            await gateway.authorize("o1", EUR, "tok_ok")

    with pytest.raises(CircuitOpenError):
        await gateway.refund("pay_1", EUR)
    assert inner.calls == 2
    inner.down = False
    clock.advance(10)
    await gateway.refund("pay_1", EUR)  # the probe
    assert gateway.breaker.state is BreakerState.CLOSED


@pytest.mark.parametrize("error", [ValueError("a bug"), asyncio.CancelledError()], ids=["bug", "cancelled"])
async def test_a_probe_raising_something_else_frees_the_slot(error: BaseException) -> None:
    clock = VirtualClock()
    inner = FlakyGateway()
    gateway = BreakerGateway(inner, breaker(clock, failures=1)[0])
    inner.down = True
    with pytest.raises(TransientError):
        await gateway.authorize("o1", EUR, "tok_ok")
    clock.advance(10)

    inner.error = error
    with pytest.raises(type(error)):
        await gateway.authorize("o1", EUR, "tok_ok")
    assert gateway.breaker.state is BreakerState.HALF_OPEN

    inner.error, inner.down = None, False
    assert isinstance(await gateway.authorize("o1", EUR, "tok_ok"), Authorization)
    assert gateway.breaker.state is BreakerState.CLOSED


async def test_each_transition_is_logged_with_the_circuit_bound() -> None:
    clock = VirtualClock()
    inner = FlakyGateway()
    gateway = BreakerGateway(inner, breaker(clock, failures=1)[0])
    inner.down = True

    with capture_logs() as logs:
        with pytest.raises(TransientError):
            await gateway.authorize("o1", EUR, "tok_ok")
        clock.advance(10)
        inner.down = False
        await gateway.authorize("o1", EUR, "tok_ok")

    assert [(e["event"], e["log_level"], e["circuit"], e["previous"]) for e in logs] == [
        ("circuit_breaker.opened", "warning", PAYMENT_GATEWAY, "closed"),
        ("circuit_breaker.half_opened", "info", PAYMENT_GATEWAY, "open"),
        ("circuit_breaker.closed", "info", PAYMENT_GATEWAY, "half_open"),
    ]
    assert logs[0]["failures"] == 1 and "gateway timed out" in logs[0]["reason"]


# ---------------------------------------------------------------- wired by the composition root


def settings(**values: Any) -> Settings:
    return Settings.model_construct(**values)


async def test_bootstrap_guards_the_gateway_with_the_breaker_the_settings_describe() -> None:
    clock = VirtualClock()
    wrapped: list[FlakyGateway] = []

    def down(_inner: Any) -> FlakyGateway:
        gateway = FlakyGateway()
        gateway.down = True
        wrapped.append(gateway)
        return gateway

    registry = bootstrap(
        settings(payment_breaker_failures=2, payment_breaker_cool_down_seconds=3.0),
        wrap_gateway=down,
        clock=clock,
        record_breakers=False,
    )
    b = registry.breakers[PAYMENT_GATEWAY]
    assert (b.threshold, b.cool_down, b.clock) == (2, timedelta(seconds=3), clock)

    handlers = registry.services["payments"].handlers
    charge = handlers["payment.charge"].keywords["gateway"]  # type: ignore[attr-defined]
    # Measured outside the breaker (its refusals are counted as rejected calls), around the faults.
    assert isinstance(charge, MeasuredGateway) and isinstance(charge.inner, BreakerGateway)
    assert charge.inner.inner is wrapped[0]
    for _ in range(4):
        with pytest.raises(TransientError):
            await charge.authorize("o1", EUR, "tok_ok")
    assert wrapped[0].calls == 2 and b.rejected == 2


def test_the_breaker_can_be_turned_off() -> None:
    registry = bootstrap(settings(payment_breaker_enabled=False))

    assert registry.breakers == {}
    gateway = registry.services["payments"].handlers["payment.charge"].keywords["gateway"]  # type: ignore[attr-defined]
    assert isinstance(gateway, MeasuredGateway) and isinstance(gateway.inner, RuleBasedGateway)


def test_the_defaults() -> None:
    defaults = Settings.model_construct()

    assert defaults.payment_breaker_enabled is True
    assert defaults.payment_breaker_failures == 5
    assert defaults.payment_breaker_cool_down_seconds == 5.0
