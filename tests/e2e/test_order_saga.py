"""The order saga end to end on real RabbitMQ and PostgreSQL: each outcome, and redelivery."""

from __future__ import annotations

import asyncio
import json

import pytest

from consumers.ledger import cash_by_order, trial_balance
from consumers.orders import get_order
from consumers.payments import charges, net_captured, payment_id_for
from consumers.stock import reservation_statuses, seed_stock, stock_levels
from tests.e2e.support import (
    DoubledReordered,
    Stack,
    StartServices,
    assert_sound,
    ledger_kinds,
    place,
    place_all,
    planned,
    saga_row,
    unique,
    wait_terminal,
    workload,
)
from tests.support import COMPENSA

pytestmark = pytest.mark.e2e


async def assert_ledger_matches_payments(stack: Stack) -> None:
    """Debits equal credits, and cash holds exactly what payments kept."""
    balance = await trial_balance(stack.engine)
    assert balance["balanced"], balance
    assert balance["balances"].get("cash:EUR", 0) == sum((await net_captured(stack.engine)).values())


async def test_happy_path_completes_charges_once_and_posts_the_ledger(stack: Stack, services: StartServices) -> None:
    await services()
    sku = unique("SKU")
    await seed_stock(stack.engine, {sku: 10})
    order = planned([(sku, 3, 1250)], token="tok_ok_visa")

    await place(stack.engine, order)

    assert (await wait_terminal(stack.engine, [order.order_id]))[order.order_id] == "completed"
    await assert_sound(stack, workload({sku: 10}, [order]))
    assert (await stock_levels(stack.engine))[sku] == (7, 0)
    assert (await reservation_statuses(stack.engine))[order.order_id] == "committed"
    charge = (await charges(stack.engine))[order.order_id]
    assert (charge.status.value, charge.amount.amount, charge.amount.currency) == ("authorized", 3750, "EUR")
    assert (charge.refunded_amount, charge.payment_id) == (0, payment_id_for(order.order_id))
    assert await ledger_kinds(stack, order.order_id) == ["capture"]
    assert (await cash_by_order(stack.engine))[order.order_id] == 3750
    await assert_ledger_matches_payments(stack)
    placed = await get_order(stack.engine, order.order_id)
    assert placed is not None and placed.status.value == "completed"

    show = await asyncio.create_subprocess_exec(
        COMPENSA,
        "saga",
        "show",
        order.order_id,
        "--json",
        env=stack.env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(show.communicate(), timeout=30)
    assert show.returncode == 0, err.decode()
    shown = json.loads(out)
    assert (shown["saga"]["status"], shown["saga"]["version"]) == ("completed", 4)
    history = shown["history"]
    assert [h["version"] for h in history] == [1, 2, 3, 4]
    assert [h["trigger"] for h in history] == ["order.created", "stock.reserved", "payment.authorized", "stock.committed"]
    assert [[s["type"] for s in h["sent"]] for h in history] == [
        ["stock.reserve"],
        ["payment.charge"],
        ["stock.commit"],
        ["order.completed"],
    ]
    assert [(h["from_status"], h["to_status"]) for h in history] == [
        (None, "running"),
        ("running", "running"),
        ("running", "running"),
        ("running", "completed"),
    ]


async def test_out_of_stock_rejects_without_charging(stack: Stack, services: StartServices) -> None:
    await services()
    sku = unique("SKU")
    await seed_stock(stack.engine, {sku: 2})
    order = planned([(sku, 5, 900)])

    await place(stack.engine, order)

    assert (await wait_terminal(stack.engine, [order.order_id]))[order.order_id] == "rejected"
    await assert_sound(stack, workload({sku: 2}, [order]))
    assert (await stock_levels(stack.engine))[sku] == (2, 0)
    assert (await reservation_statuses(stack.engine))[order.order_id] == "failed"
    assert order.order_id not in await charges(stack.engine)
    assert await ledger_kinds(stack, order.order_id) == []
    placed = await get_order(stack.engine, order.order_id)
    assert placed is not None and placed.status.value == "rejected"
    assert "insufficient stock" in (placed.reason or "")


async def test_declined_card_releases_stock_and_cancels(stack: Stack, services: StartServices) -> None:
    await services()
    sku = unique("SKU")
    await seed_stock(stack.engine, {sku: 10})
    order = planned([(sku, 2, 4000)], token="tok_decline_stolen")

    await place(stack.engine, order)

    assert (await wait_terminal(stack.engine, [order.order_id]))[order.order_id] == "cancelled"
    await assert_sound(stack, workload({sku: 10}, [order]))
    assert (await stock_levels(stack.engine))[sku] == (10, 0)
    assert (await reservation_statuses(stack.engine))[order.order_id] == "released"
    charge = (await charges(stack.engine))[order.order_id]
    assert charge.status.value == "declined"
    assert order.order_id not in await net_captured(stack.engine)
    assert await ledger_kinds(stack, order.order_id) == []
    placed = await get_order(stack.engine, order.order_id)
    assert placed is not None and placed.status.value == "cancelled"
    assert "declined" in (placed.reason or "")


async def test_commit_failure_after_charge_refunds_and_releases(stack: Stack, services: StartServices) -> None:
    # Reservations expire a millisecond after they are made, so by the time the saga
    # asks stock to commit (after the charge) the reservation has lapsed.
    await services(settings=stack.settings(reservation_ttl_seconds=0.001))
    sku = unique("SKU")
    await seed_stock(stack.engine, {sku: 10})
    order = planned([(sku, 4, 2500)])

    await place(stack.engine, order)

    assert (await wait_terminal(stack.engine, [order.order_id]))[order.order_id] == "cancelled"
    await assert_sound(stack, workload({sku: 10}, [order]))
    saga = await saga_row(stack.engine, order.order_id)
    assert saga.reason.startswith("stock.commit_failed"), saga.reason
    assert (await stock_levels(stack.engine))[sku] == (10, 0)
    assert (await reservation_statuses(stack.engine))[order.order_id] == "released"
    charge = (await charges(stack.engine))[order.order_id]
    assert (charge.status.value, charge.amount.amount, charge.refunded_amount) == ("refunded", 10_000, 10_000)
    assert await ledger_kinds(stack, order.order_id) == ["capture", "refund"]
    assert (await cash_by_order(stack.engine))[order.order_id] == 0
    await assert_ledger_matches_payments(stack)
    placed = await get_order(stack.engine, order.order_id)
    assert placed is not None and placed.status.value == "cancelled"


async def test_every_message_twice_and_out_of_order_has_the_same_outcome(stack: Stack, services: StartServices) -> None:
    doubled: list[DoubledReordered] = []

    def wrap(transport):  # type: ignore[no-untyped-def]
        doubled.append(DoubledReordered(transport))
        return doubled[-1]

    runtime = await services(wrap=wrap)
    plenty, scarce = unique("SKU"), unique("SKU")
    stock = {plenty: 20, scarce: 1}
    await seed_stock(stack.engine, stock)
    happy = [planned([(plenty, 2, 1000 + n)]) for n in range(6)]
    declined = planned([(plenty, 1, 700)], token="tok_decline_x")
    out_of_stock = planned([(scarce, 3, 500)])
    orders = [*happy, declined, out_of_stock]

    await place_all(stack.engine, orders)

    statuses = await wait_terminal(stack.engine, [o.order_id for o in orders])
    expected = {o.order_id: "completed" for o in happy}
    expected |= {declined.order_id: "cancelled", out_of_stock.order_id: "rejected"}
    assert statuses == expected
    await assert_sound(stack, workload(stock, orders))
    # Every message really did arrive twice, and the inboxes turned the copies away.
    assert doubled[0].published > 0
    duplicates = {name: p.duplicates for name, p in runtime.processors.items()}
    assert all(duplicates.values()), duplicates
    assert (await stock_levels(stack.engine))[plenty] == (20 - 2 * len(happy), 0)
    assert (await stock_levels(stack.engine))[scarce] == (1, 0)
    paid = await charges(stack.engine)
    for o in happy:
        assert (paid[o.order_id].status.value, paid[o.order_id].amount.amount) == ("authorized", o.total)
        assert await ledger_kinds(stack, o.order_id) == ["capture"]
    assert paid[declined.order_id].status.value == "declined"
    assert out_of_stock.order_id not in paid
    cash = await cash_by_order(stack.engine)
    expected_cash = {o.order_id: o.total if o in happy else 0 for o in orders}
    assert {o.order_id: cash.get(o.order_id, 0) for o in orders} == expected_cash
    await assert_ledger_matches_payments(stack)
