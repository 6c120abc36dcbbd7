"""Sagas survive their processes: a SIGKILLed orchestrator, and a SIGTERM during load."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest

from consumers.stock import seed_stock
from infra import topology as t
from infra.bootstrap import OUTBOX_SERVICES
from infra.clock import SystemClock
from outbox.uow import pending_summary
from sagas.simulation.invariants import TERMINAL_STATUSES
from sagas.simulation.workload import PlannedOrder
from tests.e2e.support import (
    METRICS,
    Process,
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
from tests.support import eventually

pytestmark = pytest.mark.e2e

Spawn = Callable[..., Process]


async def wait_consuming(stack: Stack, process: Process, queues: list[t.QueueSpec]) -> None:
    """Wait until the process consumes every queue; fail with its log if it died."""

    async def ready() -> bool:
        assert process.popen.poll() is None, f"compensa exited with {process.popen.returncode}:\n{process.tail()}"
        for queue in queues:
            assert await stack.consumer_count(queue.name) >= 1, f"nobody consumes {queue.name} yet"
        return True

    await eventually(ready, timeout=30, interval=0.1, message="compensa did not start consuming")


def mixed_orders(skus: list[str], count: int) -> tuple[list[PlannedOrder], dict[str, str]]:
    """Orders over ample stock, every seventh paid with a declining card; and their outcomes."""
    orders, expected = [], {}
    for n in range(count):
        declines = n % 7 == 3
        token = "tok_decline_x" if declines else f"tok_ok_{n}"
        order = planned([(skus[n % len(skus)], 1 + n % 3, 500 + 10 * n)], token=token)
        orders.append(order)
        expected[order.order_id] = "cancelled" if declines else "completed"
    return orders, expected


async def test_orchestrator_killed_mid_saga_is_restarted_and_finishes_every_saga(
    stack: Stack, services: StartServices, processes: Spawn
) -> None:
    # Deadlines long enough that a restart, not a timeout, is what finishes the sagas.
    timings = {"saga_step_deadline_seconds": 20.0}
    await services("stock", "payments", "ledger", "orders", settings=stack.settings(**timings))
    orchestrator = processes("saga", **timings)
    await wait_consuming(stack, orchestrator, [t.SAGA_EVENTS])
    skus = [unique("SKU") for _ in range(3)]
    stock = dict.fromkeys(skus, 100)
    await seed_stock(stack.engine, stock)
    orders, expected = mixed_orders(skus, 20)
    ids = [o.order_id for o in orders]

    await place_all(stack.engine, orders[:10])

    async def started() -> dict[str, str]:
        return await saga_statuses(stack.engine, ids)

    await eventually(started, timeout=15, interval=0.01, message="the orchestrator started no saga")
    orchestrator.popen.send_signal(signal.SIGKILL)
    assert orchestrator.popen.wait(timeout=10) == -signal.SIGKILL
    at_kill = await saga_statuses(stack.engine, ids)
    mid_saga = [i for i, s in at_kill.items() if s not in TERMINAL_STATUSES]
    # Orders keep coming while the orchestrator is down.
    await place_all(stack.engine, orders[10:])
    unfinished = [i for i in ids if at_kill.get(i) not in TERMINAL_STATUSES]
    assert mid_saga, f"no saga was mid-way at the kill: {at_kill}"
    METRICS["SIGKILL orchestrator"] = (
        f"{len(mid_saga)} sagas mid-way and {len(unfinished) - len(mid_saga)} not started at the kill; "
        "all 20 finished after restart"
    )

    restarted = processes("saga", **timings)
    await wait_consuming(stack, restarted, [t.SAGA_EVENTS])

    assert await wait_terminal(stack.engine, ids, timeout=40) == expected
    await assert_sound(stack, workload(stock, orders))


async def test_sigterm_during_load_exits_cleanly_and_a_restart_finishes_every_saga(stack: Stack, processes: Spawn) -> None:
    timings = {"saga_step_deadline_seconds": 30.0, "shutdown_grace_seconds": 10.0}
    everything = processes(**timings)
    await wait_consuming(stack, everything, list(t.WORK_QUEUES))
    skus = [unique("SKU") for _ in range(4)]
    stock = dict.fromkeys(skus, 100)
    await seed_stock(stack.engine, stock)
    orders, expected = mixed_orders(skus, 50)
    ids = [o.order_id for o in orders]

    await place_all(stack.engine, orders)

    async def some_finished() -> bool:
        statuses = await saga_statuses(stack.engine, ids)
        return any(s in TERMINAL_STATUSES for s in statuses.values())

    await eventually(some_finished, timeout=20, interval=0.01, message="no saga finished under load")
    everything.popen.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    at_signal = await saga_statuses(stack.engine, ids)
    in_flight = sum(1 for i in ids if at_signal.get(i) not in TERMINAL_STATUSES)

    async def exited() -> bool:
        return everything.popen.poll() is not None

    await eventually(exited, timeout=25, interval=0.05, message="compensa run did not exit within 25 s of SIGTERM")
    took = time.monotonic() - signalled
    assert everything.popen.returncode == 0, f"exit code {everything.popen.returncode}:\n{everything.tail()}"
    assert in_flight, "every saga had finished before SIGTERM"
    # A graceful stop publishes everything its handlers committed before it exits.
    pending = [await pending_summary(stack.engine, name, SystemClock().now()) for name in OUTBOX_SERVICES]
    assert not [p for p in pending if p["pending"]], pending
    METRICS["SIGTERM under load"] = f"exit 0 after {took:.1f}s with {in_flight} of 50 sagas in flight; all finished after restart"

    restarted = processes(**timings)
    await wait_consuming(stack, restarted, list(t.WORK_QUEUES))

    assert await wait_terminal(stack.engine, ids, timeout=60) == expected
    await assert_sound(stack, workload(stock, orders))
