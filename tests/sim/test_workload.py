"""The default workload runs the whole saga at any size: stock scales with the orders."""

from __future__ import annotations

import random

import pytest

from sagas.simulation.faults import profile
from sagas.simulation.workload import WorkloadSpec, generate
from tests.sim.support import simulate


def units_asked(spec: WorkloadSpec, seed: int = 1) -> dict[str, int]:
    asked: dict[str, int] = {}
    for order in generate(spec, random.Random(seed)).orders:
        for line in order.lines:
            asked[line.sku] = asked.get(line.sku, 0) + line.quantity
    return asked


@pytest.mark.parametrize("sagas", [200, 10_000, 100_000])
def test_scaled_stock_is_a_little_under_what_the_paying_orders_ask(sagas: int) -> None:
    spec = WorkloadSpec(sagas=sagas)
    asked = units_asked(spec)
    paying_share = (1 - spec.decline_rate) * (1 - spec.over_limit_rate)
    mean_asked = sum(asked.values()) / len(asked)
    cover = spec.initial_stock_per_sku() / (mean_asked * paying_share)

    # The safety stock weighs less the more orders there are.
    assert spec.stock_cover < cover < {200: 1.1, 10_000: 0.93, 100_000: 0.915}[sagas]
    assert spec.initial_stock_per_sku() < mean_asked
    assert generate(spec, random.Random(1)).stock == dict.fromkeys(asked, spec.initial_stock_per_sku())


def test_an_explicit_stock_wins_and_a_tiny_run_can_still_sell() -> None:
    assert WorkloadSpec(sagas=10_000, stock_per_sku=7).initial_stock_per_sku() == 7
    assert WorkloadSpec(sagas=10_000, stock_per_sku=0).initial_stock_per_sku() == 0
    assert WorkloadSpec(sagas=1).initial_stock_per_sku() == WorkloadSpec().max_quantity
    ten_thousand = WorkloadSpec(sagas=10_000).initial_stock_per_sku()
    assert 9.8 * ten_thousand < WorkloadSpec(sagas=100_000).initial_stock_per_sku() < 10 * ten_thousand


def test_the_default_workload_exercises_every_ending() -> None:
    result = simulate(sagas=200, faults=profile("chaos"))

    assert result.ok, result.violations
    outcomes = result.outcomes
    assert outcomes["completed"] > 0.7 * 200
    assert 0 < outcomes["rejected"] < 0.1 * 200  # some orders find a SKU sold out
    assert outcomes["cancelled"] > 0.1 * 200  # declines, timeouts: compensated
