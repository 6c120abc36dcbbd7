"""Payment gateway and circuit breaker metrics: a gateway wrapper and a breaker listener."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from consumers.payments.breaker import BreakerState, CircuitOpenError, Transition
from consumers.payments.gateway import Authorization, Decline, PaymentGateway
from contracts import Money, TransientError
from infra.telemetry import instruments

T = TypeVar("T")

#: compensa.circuit.state's values.
STATE_VALUES = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class MeasuredGateway:
    """Counts and times every call to `inner` (a breaker's refusals as `rejected`, untimed)."""

    def __init__(self, inner: PaymentGateway) -> None:
        self.inner = inner

    async def authorize(self, order_id: str, amount: Money, token: str) -> Authorization | Decline:
        result = await self._measure("authorize", lambda: self.inner.authorize(order_id, amount, token))
        return result

    async def refund(self, payment_id: str, amount: Money) -> None:
        await self._measure("refund", lambda: self.inner.refund(payment_id, amount))

    async def _measure(self, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        started = time.perf_counter()
        outcome = "failed"
        try:
            result = await call()
            outcome = "declined" if isinstance(result, Decline) else "succeeded"
            return result
        except CircuitOpenError:
            outcome = "rejected"
            raise
        except TransientError:
            outcome = "failed"
            raise
        finally:
            instruments.payment_gateway_calls.add(1, {"operation": operation, "outcome": outcome})
            if outcome != "rejected":
                instruments.payment_gateway_duration.record(time.perf_counter() - started, {"operation": operation})


def record_circuit_transition(transition: Transition) -> None:
    """A breaker listener: the state gauge and the transitions counter."""
    instruments.circuit_state.set(STATE_VALUES[transition.new], {"circuit": transition.circuit})
    instruments.circuit_transitions.add(1, {"circuit": transition.circuit, "state": transition.new.value})
