"""200 concurrent sagas with a mix of outcomes, checked against every invariant."""

from __future__ import annotations

import random
import time

import pytest

from consumers.ledger import trial_balance
from consumers.orders import order_statuses
from consumers.payments import net_captured
from consumers.stock import seed_stock
from sagas.simulation.workload import WorkloadSpec, generate
from tests.e2e.support import METRICS, Stack, StartServices, assert_sound, place_all, saga_row, wait_terminal

pytestmark = pytest.mark.e2e

LIMIT = 500_000


async def test_200_concurrent_sagas_with_mixed_outcomes_keep_every_invariant(stack: Stack, services: StartServices) -> None:
    # 8 SKUs of 60 units against ~800 units asked for: some orders run out of stock;
    # ~10% of customers' cards decline; ~5% of orders are priced over the gateway limit.
    spec = WorkloadSpec(sagas=200, skus=8, stock_per_sku=60, decline_rate=0.1, over_limit_rate=0.05)
    load = generate(spec, random.Random(20261123))
    await seed_stock(stack.engine, load.stock)
    # Deadlines far away: outcomes here come from stock, cards and amounts, not timing.
    settings = stack.settings(saga_step_deadline_seconds=120, saga_compensation_deadline_seconds=60, payment_amount_limit=LIMIT)
    await services(settings=settings)
    ids = [o.order_id for o in load.orders]

    started = time.perf_counter()
    await place_all(stack.engine, load.orders, concurrency=20)
    statuses = await wait_terminal(stack.engine, ids, timeout=120)
    elapsed = time.perf_counter() - started
    METRICS["200 sagas"] = f"{elapsed:.1f}s from first placement to last terminal saga = {200 / elapsed:.1f} sagas/s"

    snapshot = await assert_sound(stack, load, timeout=30)

    outcomes = {status: sum(1 for s in statuses.values() if s == status) for status in set(statuses.values())}
    METRICS["200 sagas outcomes"] = str(dict(sorted(outcomes.items())))
    for order in load.orders:
        status = statuses[order.order_id]
        if order.payment_token.startswith("tok_decline") or order.total > LIMIT:
            assert status in ("cancelled", "rejected"), (order, status)
        else:
            assert status in ("completed", "rejected"), (order, status)
        if status == "rejected":
            assert "insufficient stock" in (await saga_row(stack.engine, order.order_id)).reason
    assert outcomes.get("completed") and outcomes.get("cancelled") and outcomes.get("rejected"), outcomes

    completed_total = sum(o.total for o in load.orders if statuses[o.order_id] == "completed")
    assert sum((await net_captured(stack.engine)).values()) == completed_total
    balance = await trial_balance(stack.engine)
    assert balance["balanced"] and balance["balances"]["cash:EUR"] == completed_total, balance
    for sku, initial in load.stock.items():
        on_hand, reserved = snapshot.stock[sku]
        assert on_hand + reserved + snapshot.committed_units.get(sku, 0) == initial
    assert await order_statuses(stack.engine) == statuses
