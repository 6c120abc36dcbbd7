"""PostgreSQL restarts while consumers drain a backlog: nothing is dead-lettered, nothing is lost.

While a server shuts down, is down, or starts up it refuses work (SQLSTATE 57P01,
57P03, refused connections). The consumers must wait for it with the messages
unacknowledged, not spend their attempts or dead-letter good work; the relays and
the deadline sweeper must carry on once it is back.
"""

from __future__ import annotations

import asyncio

import pytest

from consumers.stock import seed_stock
from tests.e2e.support import (
    Stack,
    StartServices,
    assert_sound,
    place_all,
    planned,
    saga_statuses,
    unique,
    wait_terminal,
    workload,
)
from tests.harness.servers import Servers
from tests.support import eventually

pytestmark = pytest.mark.e2e

ORDERS = 150


@pytest.fixture
def postgres(servers: Servers):  # type: ignore[no-untyped-def]
    server = servers.postgres
    if not server.controllable:
        pytest.skip(f"stopping PostgreSQL needs the harness's own server; this one is from {server.origin}")
    yield server
    if not server.running:
        server.start()


@pytest.mark.parametrize("down_seconds", [0.0, 20.0], ids=["restart", "down-20s"])
async def test_a_database_outage_while_consumers_drain_a_backlog_dead_letters_nothing(
    stack: Stack,
    services: StartServices,
    postgres,
    down_seconds: float,  # type: ignore[no-untyped-def]
) -> None:
    # Deadlines far beyond the outage: the point is the messages, not timeouts.
    settings = stack.settings(
        saga_step_deadline_seconds=120.0, saga_compensation_deadline_seconds=120.0, unavailable_retry_seconds=120.0
    )
    skus = [unique("SKU") for _ in range(4)]
    await seed_stock(stack.engine, dict.fromkeys(skus, 1000))
    orders = [planned([(skus[n % 4], 1, 500 + n)], token="tok_ok_visa") for n in range(ORDERS)]
    ids = [order.order_id for order in orders]
    await place_all(stack.engine, orders, concurrency=20)
    await services(settings=settings)

    async def some_done() -> int:
        done = sum(s == "completed" for s in (await saga_statuses(stack.engine, ids)).values())
        assert done >= 5
        return done

    done_before = await eventually(some_done, timeout=30, interval=0.02, message="the backlog started draining")
    await asyncio.to_thread(postgres.stop)
    try:
        if down_seconds:
            await asyncio.sleep(down_seconds)  # the outage itself is what is under test
    finally:
        await asyncio.to_thread(postgres.start)
    await stack.engine.dispose()  # the test's own reads: drop connections the restart killed

    statuses = await wait_terminal(stack.engine, ids, timeout=120)
    assert done_before < ORDERS, "the backlog was drained before the outage: nothing was tested"
    assert set(statuses.values()) == {"completed"}, {s: list(statuses.values()).count(s) for s in set(statuses.values())}
    await assert_sound(stack, workload(dict.fromkeys(skus, 1000), orders), timeout=60)
