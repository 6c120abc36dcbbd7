"""A burst of new orders does not make the sagas in flight time out (no congestion collapse).

300 orders arrive at once, about ten times what this machine completes per second,
with 5 s step deadlines. Without admission control every start was consumed first, the
replies queued behind them and the deadlines fired (0 of 1,000 completed in the
campaign that found it). With `saga_max_in_flight`, starts wait un-started in
saga.starts; the outcome is the one the same orders get trickled in: every good card
completes, every declined card is cancelled for the decline, none for a deadline.
"""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import select

from consumers.stock import seed_stock
from sagas.store import count_in_flight
from sagas.tables import saga_instances
from tests.e2e.support import (
    METRICS,
    Stack,
    StartServices,
    assert_sound,
    place_all,
    planned,
    unique,
    wait_terminal,
    workload,
)

pytestmark = pytest.mark.e2e

ORDERS = 300
MAX_IN_FLIGHT = 20


async def test_a_burst_of_ten_times_the_sustainable_rate_ends_as_a_trickle_would(stack: Stack, services: StartServices) -> None:
    settings = stack.settings(saga_max_in_flight=MAX_IN_FLIGHT, saga_step_deadline_seconds=5.0)
    skus = [unique("SKU") for _ in range(8)]
    stock = dict.fromkeys(skus, 1000)
    await seed_stock(stack.engine, stock)
    orders = [planned([(skus[n % 8], 1, 700)], token="tok_decline_card" if n % 7 == 0 else "tok_ok_visa") for n in range(ORDERS)]
    runtime = await services(settings=settings)

    peak = 0
    watching = True

    async def watch_in_flight() -> None:
        nonlocal peak
        while watching:
            async with stack.engine.connect() as connection:
                peak = max(peak, await count_in_flight(connection))
            await asyncio.sleep(0.02)  # the sampling interval of the peak, not a wait for a condition

    watcher = asyncio.create_task(watch_in_flight())
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        await place_all(stack.engine, orders, concurrency=50)
        statuses = await wait_terminal(stack.engine, [o.order_id for o in orders], timeout=120)
    finally:
        watching = False
        await watcher
    elapsed = loop.time() - started

    expected = {o.order_id: "cancelled" if o.payment_token.startswith("tok_decline") else "completed" for o in orders}
    assert statuses == expected
    async with stack.engine.connect() as connection:
        reasons = (
            (await connection.execute(select(saga_instances.c.reason).where(saga_instances.c.status == "cancelled")))
            .scalars()
            .all()
        )
    assert reasons and all("deadline" not in (reason or "") for reason in reasons), set(reasons)
    assert peak <= MAX_IN_FLIGHT, f"{peak} sagas in flight at once; the bound is {MAX_IN_FLIGHT}"
    assert runtime.gate is not None and runtime.gate.waited > 0, "the burst never reached the bound"
    await assert_sound(stack, workload(stock, orders))
    METRICS["burst"] = f"{ORDERS} orders at once, {ORDERS / elapsed:.1f} sagas/s, peak in flight {peak}"
