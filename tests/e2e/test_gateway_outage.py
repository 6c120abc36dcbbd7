"""The payment gateway goes down, then recovers, on the real stack: the circuit breaker opens and closes.

While the gateway is down the breaker opens after a few transient failures, and charges
then fail fast (through the delay queues) without calling the gateway; each probe after
the cool-down finds it still down and opens it again. Once it is back, a probe closes
the circuit, the waiting charges go through, and every saga ends as its card says.
`compensa health` reports the open breaker meanwhile (the payments service records it in
the database) and is clear again after.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import pytest

from consumers.payments.breaker import PAYMENT_GATEWAY, BreakerState, Transition
from consumers.payments.gateway import Authorization, Decline, PaymentGateway
from consumers.stock import seed_stock
from contracts import Money, TransientError
from contracts.messages import ChargePayment
from infra.bootstrap import bootstrap
from infra.health import check_health
from outbox.uow import Handler, UnitOfWork
from tests.e2e.support import METRICS, Stack, StartServices, assert_sound, place_all, planned, unique, wait_terminal, workload
from tests.support import eventually

pytestmark = pytest.mark.e2e

ORDERS = 40
DECLINED = 5


class GatewayOutage:
    """The gateway payments would call, unreachable while `down` is set; counts the calls that reach it."""

    def __init__(self, inner: PaymentGateway) -> None:
        self.inner = inner
        self.down = True
        self.calls = 0

    def _reach(self) -> None:
        self.calls += 1
        if self.down:
            raise TransientError("payment gateway unreachable (test outage)")

    async def authorize(self, order_id: str, amount: Money, token: str) -> Authorization | Decline:
        self._reach()
        return await self.inner.authorize(order_id, amount, token)

    async def refund(self, payment_id: str, amount: Money) -> None:
        self._reach()
        await self.inner.refund(payment_id, amount)


async def test_the_breaker_opens_during_an_outage_and_every_saga_still_ends_right(stack: Stack, services: StartServices) -> None:
    # Retries outlast the outage (about 15 s of delays, at least half that with jitter);
    # deadlines far beyond it: the point is the breaker, not timeouts.
    settings = stack.settings(
        max_attempts=20,
        payment_breaker_failures=3,
        payment_breaker_cool_down_seconds=0.5,
        saga_step_deadline_seconds=120.0,
        saga_compensation_deadline_seconds=120.0,
    )
    outages: list[GatewayOutage] = []
    charges = Counter[str]()

    def outage(inner: PaymentGateway) -> PaymentGateway:
        outages.append(GatewayOutage(inner))
        return outages[-1]

    def count_charges(service: str, handlers: Mapping[str, Handler]) -> Mapping[str, Handler]:
        if service != "payments":
            return handlers
        charge = handlers[ChargePayment.message_type]

        async def counted(uow: UnitOfWork, message: Any) -> None:
            charges[message.payload.order_id] += 1
            await charge(uow, message)

        return {**handlers, ChargePayment.message_type: counted}

    registry = bootstrap(settings, wrap_gateway=outage, wrap_handlers=count_charges)
    breaker = registry.breakers[PAYMENT_GATEWAY]
    transitions: list[Transition] = []
    breaker.subscribe(transitions.append)
    (gateway,) = outages

    skus = [unique("SKU") for _ in range(4)]
    stock = dict.fromkeys(skus, 1000)
    await seed_stock(stack.engine, stock)
    orders = [
        planned([(skus[n % 4], 1, 700 + n)], token="tok_decline_e2e" if n < DECLINED else "tok_ok_e2e") for n in range(ORDERS)
    ]
    ids = [order.order_id for order in orders]
    await services(settings=settings, registry=registry)
    await place_all(stack.engine, orders)

    def reopened() -> bool:
        # Opened, and opened again after a probe failed: the cool-down and the probe both ran.
        assert [t.new for t in transitions].count(BreakerState.OPEN) >= 2, [(t.old, t.new) for t in transitions]
        return True

    await eventually(reopened, timeout=30, message="the breaker opened, probed and opened again")

    async def health_degraded() -> dict[str, Any]:
        check = (await check_health(settings, engine=stack.engine))["checks"]["circuit_breakers"]
        assert check.get("degraded"), check
        return check

    check = await eventually(health_degraded, timeout=10, message="health reported the open breaker")
    (circuit,) = check["circuits"]
    assert circuit["circuit"] == PAYMENT_GATEWAY and circuit["state"] in ("open", "half_open")
    assert circuit["failures"] >= 3

    gateway.down = False  # the gateway recovers
    statuses = await wait_terminal(stack.engine, ids, timeout=60)

    expected = {order.order_id: "cancelled" if order.payment_token.startswith("tok_decline") else "completed" for order in orders}
    assert statuses == expected
    assert breaker.state is BreakerState.CLOSED
    assert (transitions[-1].old, transitions[-1].new) == (BreakerState.HALF_OPEN, BreakerState.CLOSED)
    attempts = sum(charges.values())
    # Fail fast: charges the open breaker refused never reached the gateway.
    assert breaker.rejected > 0
    assert gateway.calls < attempts, (gateway.calls, attempts)
    assert set(charges) == set(ids)

    async def health_clear() -> bool:
        check = (await check_health(settings, engine=stack.engine))["checks"]["circuit_breakers"]
        assert check["ok"] and [c["state"] for c in check["circuits"]] == ["closed"], check
        return True

    await eventually(health_clear, timeout=10, message="health saw the breaker closed")
    await assert_sound(stack, workload(stock, orders), timeout=30)
    METRICS["gateway outage: charge attempts / gateway calls / refused"] = f"{attempts} / {gateway.calls} / {breaker.rejected}"
