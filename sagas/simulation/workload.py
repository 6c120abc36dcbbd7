"""The simulated workload: orders over a small catalogue with limited stock, seeded."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from contracts.messages import OrderLine

#: Safety stock, in standard deviations of the units all orders ask of one SKU.
SAFETY_SDS = 1.0


@dataclass(frozen=True)
class WorkloadSpec:
    sagas: int = 200
    skus: int = 8
    #: Units on hand per SKU at the start; None: scaled to the orders (`initial_stock_per_sku`).
    stock_per_sku: int | None = None
    #: Scaled stock as a share of the units the paying orders (neither declined nor over
    #: the limit) ask for. Timed-out and compensated orders give their units back too, so
    #: a share a little below 1 sells out only near the end of a run: most orders complete
    #: and the last ones find SKUs sold out, at 200 orders as at 100,000.
    stock_cover: float = 0.9
    max_lines: int = 3
    max_quantity: int = 3
    #: Share of customers whose card always declines.
    decline_rate: float = 0.1
    #: Share of orders priced above the gateway's amount limit.
    over_limit_rate: float = 0.02
    #: Mean seconds of virtual time between two orders.
    mean_interarrival_seconds: float = 0.5
    currency: str = "EUR"

    def initial_stock_per_sku(self) -> int:
        """Units each SKU starts with: `stock_per_sku`, or scaled to the orders.

        Scaled: what the paying orders ask of an average SKU times `stock_cover`, plus a
        safety stock of `SAFETY_SDS` standard deviations of what all the orders ask of one,
        as a shop keeps against demand it cannot foresee. Without it a small run, whose
        SKUs' demands differ most, would sell out earliest.
        """
        if self.stock_per_sku is not None:
            return self.stock_per_sku
        # An order has 1..max_lines distinct SKUs, and each line 1..max_quantity units, uniformly.
        lines = sum(min(self.skus, count) for count in range(1, self.max_lines + 1)) / self.max_lines
        quantity = (1 + self.max_quantity) / 2
        quantity_squared = (1 + self.max_quantity) * (1 + 2 * self.max_quantity) / 6
        # Units one order asks of a given SKU: its mean and variance.
        share = lines / self.skus
        mean = share * quantity
        variance = share * quantity_squared - mean**2
        paying = (1 - self.decline_rate) * (1 - self.over_limit_rate)
        stock = self.sagas * paying * mean * self.stock_cover + SAFETY_SDS * math.sqrt(self.sagas * variance)
        # Never less than one line can ask for, so even a tiny run completes orders.
        return max(self.max_quantity, math.ceil(stock))


@dataclass(frozen=True)
class PlannedOrder:
    order_id: str
    at_seconds: float
    customer_id: str
    lines: tuple[OrderLine, ...]
    payment_token: str

    @property
    def saga_id(self) -> str:
        """An order's saga is named after it."""
        return self.order_id

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
    stock = dict.fromkeys(prices, spec.initial_stock_per_sku())
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
