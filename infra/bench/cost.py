"""What a completed saga costs: CPU of each compensa process, transactions and statements
on PostgreSQL, publishes and deliveries on RabbitMQ, counted over a measured window.

The counters are read where they are kept, not estimated: CPU from the kernel
(`getrusage` for this process, `/proc/<pid>/stat` for the others), statements and
transactions from PostgreSQL's `pg_stat_statements` (when the server preloads it;
the test harness does), publishes and deliveries from RabbitMQ's management API.
A counter the servers do not offer is reported as None, never guessed.
"""

from __future__ import annotations

import asyncio
import os
import resource
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import structlog
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from infra.health import management_endpoint

log = structlog.get_logger("compensa.bench")

_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
#: pg_stat_statements' own text for the transaction control statements.
_TRANSACTION_END = ("commit", "rollback", "end", "abort")
_TRANSACTION_CONTROL = ("begin", "start transaction", "commit", "rollback", "end", "abort", "savepoint", "release")
#: The counter queries carry this mark, so that reading the counters does not count itself.
_MARK = "compensa bench counters"
_PROBE = text("SELECT count(*) FROM pg_stat_statements /* compensa bench counters */")
_COUNTERS = text(
    "SELECT query, calls FROM pg_stat_statements /* compensa bench counters */ "
    "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
)


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of another process, None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return None
    # After "pid (comm)": state is field 3, utime 14 and stime 15 of the full line.
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_SECOND


@dataclass
class Snapshot:
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    transactions: int | None = None
    statements: int | None = None
    publishes: int | None = None
    deliveries: int | None = None


class CostMeter:
    """Snapshots of every counter; the difference of two, divided by completed sagas."""

    def __init__(
        self,
        engine: AsyncEngine,
        management_url: str | None,
        processes: Mapping[str, int | None],
    ) -> None:
        self.engine = engine
        self.management_url = management_url
        #: Label -> pid; None means this process.
        self.processes = dict(processes)
        self._statements_ready: bool | None = None

    async def _ensure_statements(self) -> bool:
        if self._statements_ready is None:
            try:
                async with self.engine.begin() as connection:
                    await connection.execute(text("CREATE EXTENSION IF NOT EXISTS pg_stat_statements"))
                async with self.engine.connect() as connection:
                    await connection.execute(_PROBE)
                self._statements_ready = True
            except DBAPIError as exc:
                log.warning("bench.statements_unavailable", error=str(exc.orig).splitlines()[0] if exc.orig else repr(exc))
                self._statements_ready = False
        return self._statements_ready

    async def _database(self, snapshot: Snapshot) -> None:
        if self.engine.dialect.name != "postgresql" or not await self._ensure_statements():
            return
        async with self.engine.connect() as connection:
            rows = (await connection.execute(_COUNTERS)).all()
        transactions = statements = 0
        for query, calls in rows:
            head = query.strip().lower()
            if _MARK in query:
                continue
            if head.startswith(_TRANSACTION_END):
                transactions += calls
            elif not head.startswith(_TRANSACTION_CONTROL):
                statements += calls
        snapshot.transactions, snapshot.statements = transactions, statements

    async def _broker(self, snapshot: Snapshot) -> None:
        if not self.management_url:
            return
        base, auth, shown = management_endpoint(self.management_url)
        try:
            async with httpx.AsyncClient(auth=auth, timeout=5.0) as client:
                response = await client.get(f"{base}/api/overview", params={"columns": "message_stats"})
                response.raise_for_status()
        except httpx.HTTPError as exc:
            log.warning("bench.broker_counters_unavailable", management_url=shown, error=repr(exc))
            return
        stats = response.json().get("message_stats") or {}
        snapshot.publishes = int(stats.get("publish", 0))
        snapshot.deliveries = int(stats.get("deliver_get", 0))

    async def settle(self) -> None:
        """Wait until the broker's counters stop moving: the management plugin updates
        them every few seconds, so a reading right after the work lags behind it."""
        if not self.management_url:
            return
        previous: tuple[int | None, int | None] = (-1, -1)
        for _ in range(15):
            probe = Snapshot()
            await self._broker(probe)
            if (probe.publishes, probe.deliveries) == previous:
                return
            previous = (probe.publishes, probe.deliveries)
            await asyncio.sleep(1.0)

    async def snapshot(self) -> Snapshot:
        """Read every counter now."""
        snapshot = Snapshot()
        for label, pid in self.processes.items():
            seconds = own_cpu_seconds() if pid is None else process_cpu_seconds(pid)
            if seconds is not None:
                snapshot.cpu_seconds[label] = seconds
        await self._database(snapshot)
        await self._broker(snapshot)
        return snapshot

    async def closing_snapshot(self) -> Snapshot:
        """CPU and statements at the end of the work, the broker's counts once settled
        (so the idle wait for them costs no CPU in the figures)."""
        snapshot = await self.snapshot()
        await self.settle()
        await self._broker(snapshot)
        return snapshot


def per_saga(before: Snapshot, after: Snapshot, completed: int) -> dict[str, Any]:
    """Each counter's growth between two snapshots per completed saga (None when not counted)."""
    sagas = max(completed, 1)

    def each(name: str) -> float | None:
        start, end = getattr(before, name), getattr(after, name)
        return None if start is None or end is None else (end - start) / sagas

    cpu_ms = {
        label: (after.cpu_seconds[label] - before.cpu_seconds[label]) * 1000 / sagas
        for label in before.cpu_seconds
        if label in after.cpu_seconds
    }
    return {
        "cpu_ms": cpu_ms,
        "cpu_ms_total": sum(cpu_ms.values()),
        "transactions": each("transactions"),
        "statements": each("statements"),
        "publishes": each("publishes"),
        "deliveries": each("deliveries"),
    }


def describe(cost: Mapping[str, Any], labels: Sequence[str] | None = None) -> str:
    """One line: CPU per process and in sum, then the server-side counts, per saga."""
    cpu = cost["cpu_ms"]
    parts = [f"{label} {cpu[label]:.1f}" for label in (labels or cpu)]
    counts = []
    for key in ("transactions", "statements", "publishes", "deliveries"):
        value = cost[key]
        counts.append(f"{value:.1f} {key}" if value is not None else f"{key} n/a")
    return f"per saga: CPU {cost['cpu_ms_total']:.1f} ms ({', '.join(parts)}); " + ", ".join(counts)
