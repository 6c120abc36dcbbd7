"""An operator cancels a running saga with `compensa saga cancel`: it compensates, nothing leaks."""

from __future__ import annotations

import pytest

from consumers.orders import get_order
from consumers.payments import charges
from consumers.stock import reservation_statuses, seed_stock, stock_levels
from tests.e2e.support import (
    Stack,
    StartServices,
    assert_sound,
    place,
    planned,
    saga_row,
    saga_triggers,
    unique,
    wait_terminal,
    workload,
)
from tests.support import assert_one_line_error, compensa, eventually

pytestmark = pytest.mark.e2e


async def test_an_operator_cancels_a_saga_waiting_on_payments(stack: Stack, services: StartServices) -> None:
    # Long deadlines: only the operator ends this saga.
    timings = {"saga_step_deadline_seconds": 120.0, "saga_compensation_deadline_seconds": 120.0}
    await services("saga", "stock", "ledger", "orders", settings=stack.settings(**timings))
    sku = unique("SKU")
    await seed_stock(stack.engine, {sku: 10})
    order = planned([(sku, 4, 1000)])
    await place(stack.engine, order)

    async def waiting_on_payments() -> bool:
        assert (await reservation_statuses(stack.engine)).get(order.order_id) == "reserved"
        return (await saga_row(stack.engine, order.order_id)).step == 1

    await eventually(waiting_on_payments, timeout=15, message="saga did not reach the charge step")
    env = stack.env(**timings)

    run = await compensa(env, "saga", "cancel", order.order_id, "--reason", "customer called", "--yes", "--json")
    assert run.returncode == 0, run.stderr
    result = run.json()
    assert (result["status"], result["trigger"], result["sent"]) == (
        "compensating",
        "operator:cancel",
        ["payment.refund", "stock.release"],
    )

    # Stock comes back at once; the order waits for payments to confirm there is no charge.
    async def released() -> bool:
        assert (await stock_levels(stack.engine))[sku] == (10, 0)
        return True

    await eventually(released, timeout=15, message="stock not released after the cancel")
    assert (await get_order(stack.engine, order.order_id)).status.value == "pending"  # type: ignore[union-attr]

    # Payments comes back: the stale charge and the void race; whatever it charged, it gives back.
    await services("payments", settings=stack.settings(**timings))
    assert (await wait_terminal(stack.engine, [order.order_id], timeout=20))[order.order_id] == "cancelled"
    await assert_sound(stack, workload({sku: 10}, [order]))
    settled = await get_order(stack.engine, order.order_id)
    assert settled is not None and settled.status.value == "cancelled"
    assert settled.reason == "cancelled by operator: customer called"
    assert (await charges(stack.engine))[order.order_id].status.value in ("refunded", "voided")
    assert "operator:cancel" in await saga_triggers(stack.engine, order.order_id)

    # A finished saga cannot be cancelled again; an unknown one is named.
    assert_one_line_error(
        await compensa(env, "saga", "cancel", order.order_id, "--reason", "again", "--yes"),
        f"saga {order.order_id}",
        "only a running saga can be cancelled",
    )
    assert_one_line_error(await compensa(env, "saga", "cancel", "nobody", "--reason", "x", "--yes"), "no saga 'nobody'")
    blank = await compensa(env, "saga", "cancel", order.order_id, "--reason", " ", "--yes")
    assert blank.returncode == 2 and "--reason" in blank.stderr and "Traceback" not in blank.stderr
