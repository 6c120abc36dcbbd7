"""The simulated workload: orders over a small catalogue with limited stock, seeded."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from contracts.messages import OrderLine


@dataclass(frozen=True)
class WorkloadSpec:
    sagas: int = 200
    skus: int = 8
    #: Units on hand per SKU at the start; low enough that some orders run out.
    stock_per_sku: int = 60
    max_lines: int = 3
    max_quantity: int = 3
    #: Share of customers whose card always declines.
    decline_rate: float = 0.1
    #: Share of orders priced above the gateway's amount limit.
    over_limit_rate: float = 0.02
    #: Mean seconds of virtual time between two orders.
    mean_interarrival_seconds: float = 0.5
    currency: str = "EUR"


@dataclass(frozen=True)
class PlannedOrder:
    order_id: str
    at_seconds: float
    customer_id: str
    lines: tuple[OrderLine, ...]
    payment_token: str

    @property
    def total(self) -> int:
        return sum(line.quantity * line.unit_price for line in self.lines)


@dataclass(frozen=True)
class Workload:
    spec: WorkloadSpec
    stock: dict[str, int] = field(default_factory=dict)
    orders: tuple[PlannedOrder, ...] = ()


def sku_name(index: int) -> str:
    return f"SKU-{index:03d}"


def generate(spec: WorkloadSpec, rng: random.Random) -> Workload:
    """Draw every order up front from the one seeded RNG, so runs repeat exactly."""
    prices = {sku_name(i): rng.randrange(100, 20_000, 50) for i in range(spec.skus)}
    stock = dict.fromkeys(prices, spec.stock_per_sku)
    orders = []
    at = 0.0
    width = len(str(spec.sagas))
    for n in range(spec.sagas):
        at += rng.expovariate(1.0 / spec.mean_interarrival_seconds)
        chosen = rng.sample(sorted(prices), k=min(spec.skus, rng.randint(1, spec.max_lines)))
        over_limit = rng.random() < spec.over_limit_rate
        lines = tuple(
            OrderLine(
                sku=sku,
                quantity=rng.randint(1, spec.max_quantity),
                unit_price=prices[sku] * (400 if over_limit else 1),
            )
            for sku in sorted(chosen)
        )
        customer = rng.randrange(10_000)
        token = f"tok_decline_{customer}" if rng.random() < spec.decline_rate else f"tok_ok_{customer}"
        orders.append(
            PlannedOrder(
                order_id=f"ord-{n:0{width}d}",
                at_seconds=round(at, 6),
                customer_id=f"cust-{customer}",
                lines=lines,
                payment_token=token,
            )
        )
    return Workload(spec=spec, stock=stock, orders=tuple(orders))
