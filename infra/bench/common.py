"""What every benchmark shares: where the servers are, percentiles, the closed loop,
the process's memory, the benchmark message and one printed figure."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable

from contracts.messages import LedgerUpdated, Posting


def environment_urls() -> tuple[str, str]:
    """PostgreSQL and RabbitMQ from COMPENSA_DATABASE_URL / COMPENSA_AMQP_URL; ValueError says how to get them."""
    database_url = os.environ.get("COMPENSA_DATABASE_URL", "")
    amqp_url = os.environ.get("COMPENSA_AMQP_URL", "")
    if not database_url.startswith("postgresql") or not amqp_url:
        raise ValueError(
            "benchmarks need PostgreSQL and RabbitMQ: set COMPENSA_DATABASE_URL=postgresql+asyncpg://… and "
            "COMPENSA_AMQP_URL=amqp://…, or run `bash scripts/bench.sh`, which starts both"
        )
    return database_url, amqp_url


def percentile(values: list[float], q: float) -> float:
    """The `q`th percentile (nearest rank on the sorted values), NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def closed_loop(clients: int, seconds: float, one: Callable[[int, int], Awaitable[None]]) -> dict[str, float]:
    """`clients` loops each calling `one(client, n)` back to back for `seconds`; rate and latency."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def loop(client: int) -> None:
        n = 0
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await one(client, n)
            latencies.append(time.perf_counter() - started)
            n += 1

    started = time.perf_counter()
    await asyncio.gather(*(loop(c) for c in range(clients)))
    elapsed = time.perf_counter() - started
    return {
        "per_s": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "mean_ms": statistics.fmean(latencies) * 1000 if latencies else float("nan"),
        "count": float(len(latencies)),
    }


def rss_mb() -> float:
    """This process's resident memory in MB (from /proc: Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


#: Orders (sagas) the benchmark messages are spread over: each keeps its own order through the relay.
BENCH_SAGAS = 500


def bench_saga(n: int) -> str:
    """The order (saga, correlation id) of the `n`th benchmark message."""
    return f"bench-{n % BENCH_SAGAS}"


def ledger_event(n: int) -> LedgerUpdated:
    """The `n`th message the relay and replay benchmarks move: a small, valid `ledger.updated`.

    Its order id is `bench_saga(n)`, the correlation id it must travel under.
    """
    return LedgerUpdated(
        order_id=bench_saga(n),
        transaction_id=f"capture:bench-{n}",
        postings=(Posting(account="cash:EUR", debit=100, credit=0), Posting(account="sales:EUR", debit=0, credit=100)),
        balances={"cash:EUR": 100},
    )


def figure(label: str, value: float, unit: str = "") -> str:
    """One line of a benchmark report: label, value and unit in aligned columns."""
    return f"  {label:<52} {value:>12,.1f} {unit}"
