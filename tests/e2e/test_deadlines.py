"""A participant that does not answer: the deadline compensates, and its late work leaks nothing."""

from __future__ import annotations

import pytest

from consumers.ledger import cash_by_order
from consumers.orders import get_order
from consumers.payments import charges, net_captured
from consumers.stock import reservation_statuses, seed_stock, stock_levels
from tests.e2e.support import (
    METRICS,
    Stack,
    StartServices,
    assert_sound,
    ledger_kinds,
    place,
    planned,
    saga_row,
    saga_triggers,
    unique,
    wait_terminal,
    workload,
)
from tests.support import eventually

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(
    "payments_prefetch",
    [
        # One at a time: the stale charge goes first and captures, then the refund returns it.
        pytest.param(1, id="late-charge-captures-then-refunded"),
        # Charge and refunds race: either the charge captures and is refunded, or the
        # refund's void tombstone makes the charge decline.
        pytest.param(32, id="late-charge-races-refund"),
    ],
)
async def test_silent_payments_times_out_and_its_late_charge_leaks_nothing(
    stack: Stack, services: StartServices, payments_prefetch: int
) -> None:
    timings = {"saga_step_deadline_seconds": 2.0, "saga_compensation_deadline_seconds": 2.0}
    await services("saga", "stock", "ledger", "orders", settings=stack.settings(**timings))
    sku = unique("SKU")
    await seed_stock(stack.engine, {sku: 10})
    order = planned([(sku, 3, 3300)])

    await place(stack.engine, order)

    # payment.charge waits in payments.commands; the charge deadline fires and the
    # saga compensates: stock comes back although payments never said a word.
    async def released() -> bool:
        assert (await reservation_statuses(stack.engine)).get(order.order_id) == "released"
        assert (await stock_levels(stack.engine))[sku] == (10, 0)
        return True

    await eventually(released, timeout=15, message="stock not released after the charge deadline")
    saga = await saga_row(stack.engine, order.order_id)
    assert saga.status in ("compensating", "compensation_failed"), saga.status
    assert saga.reason == "deadline: charge"
    assert "deadline:step:charge" in await saga_triggers(stack.engine, order.order_id)
    assert order.order_id not in await charges(stack.engine)
    # The saga cannot know whether the charge happened, so it waits for the refund's
    # confirmation (a void, if nothing was charged) before it calls the order cancelled.
    assert (await get_order(stack.engine, order.order_id)).status.value == "pending"  # type: ignore[union-attr]

    # Payments comes back and works through its queue: the stale payment.charge and
    # the refund(s) the saga sent meanwhile. Whatever it charges, it gives back.
    await services("payments", settings=stack.settings(**timings, prefetch=payments_prefetch))

    assert (await wait_terminal(stack.engine, [order.order_id], timeout=20))[order.order_id] == "cancelled"
    await assert_sound(stack, workload({sku: 10}, [order]))
    charge = (await charges(stack.engine))[order.order_id]
    assert charge.status.value in ("refunded", "voided"), charge
    METRICS[f"late payment.charge, payments prefetch {payments_prefetch}"] = (
        f"charge {charge.status.value} (refunded {charge.refunded_amount} of {charge.amount.amount})"
    )
    if charge.status.value == "refunded" or payments_prefetch == 1:  # charged late, then refunded in full
        assert (charge.status.value, charge.amount.amount, charge.refunded_amount) == ("refunded", order.total, order.total)
        assert await ledger_kinds(stack, order.order_id) == ["capture", "refund"]
        # The late payment.authorized reached the compensating saga, which undid it.
        assert "payment.authorized" in await saga_triggers(stack.engine, order.order_id)
    assert (await net_captured(stack.engine)).get(order.order_id, 0) == 0
    assert (await cash_by_order(stack.engine)).get(order.order_id, 0) == 0
    assert (await stock_levels(stack.engine))[sku] == (10, 0)
    placed = await get_order(stack.engine, order.order_id)
    assert placed is not None and placed.status.value == "cancelled"
