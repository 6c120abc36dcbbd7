"""Circuit breakers in the database, for `compensa health`: one row per circuit and process.

A breaker lives in the payments process (consumers/payments/breaker.py); health runs in
another. `BreakerRecorder` listens to a breaker and keeps its row in
`circuit_breakers`, off the hot path: a background task writes each transition, and
while the circuit is not closed rewrites the row every `REFRESH_SECONDS`, so a row not
refreshed for `STALE_AFTER_SECONDS` belongs to a process that is gone (health then
ignores it). Once closed and written, the task ends: a closed breaker costs nothing.
`breaker_rows` is the read side.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog
from sqlalchemy import Column, Index, Integer, String, Table, Text, delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from consumers.payments.breaker import BreakerState, Transition
from contracts.clock import Clock
from contracts.columns import UtcDateTime
from outbox.tables import metadata

log = structlog.get_logger("compensa.circuit_breakers")

#: How often a breaker that is not closed rewrites its row.
REFRESH_SECONDS = 15.0
#: A row older than this was left by a process that stopped: health does not count it.
STALE_AFTER_SECONDS = 4 * REFRESH_SECONDS
#: Rows not written for this long are deleted by the next write of the same circuit.
RETENTION = timedelta(days=7)
#: The longest reason kept (an exception's text, possibly long).
REASON_LIMIT = 500

circuit_breakers = Table(
    "circuit_breakers",
    metadata,
    Column("circuit", String(64), primary_key=True, doc="the circuit's name, e.g. payment_gateway"),
    Column("holder", String(255), primary_key=True, doc="the process holding the breaker: host:pid"),
    Column("state", String(16), nullable=False, doc="closed|open|half_open"),
    Column("since", UtcDateTime(), nullable=False, doc="when it entered this state"),
    Column("failures", Integer, nullable=False, doc="transient failures in a row when it entered this state"),
    Column("reason", Text, nullable=False, doc="why it entered this state"),
    Column("updated_at", UtcDateTime(), nullable=False, doc="last written: at a transition, and every refresh while not closed"),
    Index("ix_circuit_breakers_updated_at", "updated_at"),
)


def this_process() -> str:
    """The holder name of this process: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"[:255]


@dataclass(frozen=True)
class BreakerRow:
    circuit: str
    holder: str
    state: str
    since: datetime
    failures: int
    reason: str
    updated_at: datetime


async def breaker_rows(connection: AsyncConnection) -> list[BreakerRow]:
    """Every recorded breaker, by circuit, then most recently written first."""
    c = circuit_breakers.c
    rows = await connection.execute(select(circuit_breakers).order_by(c.circuit, c.updated_at.desc(), c.holder))
    return [BreakerRow(**row._mapping) for row in rows]


async def record(connection: AsyncConnection, holder: str, transition: Transition, now: datetime) -> None:
    """Write the state `transition` entered as `holder`'s row of its circuit; prune long-gone holders' rows."""
    c = circuit_breakers.c
    values = {
        "state": transition.new.value,
        "since": transition.at,
        "failures": transition.failures,
        "reason": transition.reason[:REASON_LIMIT],
        "updated_at": now,
    }
    mine = (c.circuit == transition.circuit) & (c.holder == holder)
    # Only this process writes its row, so there is no race between the two statements.
    if (await connection.execute(update(circuit_breakers).where(mine).values(**values))).rowcount == 0:
        await connection.execute(insert(circuit_breakers).values(circuit=transition.circuit, holder=holder, **values))
    await connection.execute(
        delete(circuit_breakers).where(c.circuit == transition.circuit, c.updated_at < now - RETENTION, c.holder != holder)
    )


class BreakerRecorder:
    """A breaker listener that keeps the breaker's row in `circuit_breakers` (see the module's docstring).

    The engine is made at the first write, from `database_url`, with no pool: writes
    are rare and nobody disposes of it. A failed write is logged and tried again at the
    next transition or refresh.
    """

    def __init__(
        self,
        database_url: str,
        clock: Clock,
        *,
        holder: str | None = None,
        refresh_seconds: float = REFRESH_SECONDS,
    ) -> None:
        self.database_url = database_url
        self.clock = clock
        self.holder = holder
        self.refresh_seconds = refresh_seconds
        self.writes = 0
        self._engine: AsyncEngine | None = None
        self._latest: Transition | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __call__(self, transition: Transition) -> None:
        self._latest = transition
        self._wake.set()
        if self._task is None or self._task.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                log.warning("circuit_breaker.not_recorded", circuit=transition.circuit, reason="no event loop running")
                return
            self._task = loop.create_task(self._run(), name=f"circuit_breaker:{transition.circuit}")

    async def idle(self) -> None:
        """Wait until what the breaker last did is written and nothing is left to refresh (tests)."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            latest = self._latest
            assert latest is not None
            written = await self._write(latest)
            if written and latest.new is BreakerState.CLOSED and not self._wake.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.refresh_seconds)

    async def _write(self, transition: Transition) -> bool:
        if self._engine is None:
            from infra.db import create_engine

            self._engine = create_engine(self.database_url, pooled=False)
        self.holder = self.holder or this_process()
        try:
            async with self._engine.begin() as connection:
                await record(connection, self.holder, transition, self.clock.now())
        except Exception as exc:  # noqa: BLE001 - the record is for health; the payment goes on, the next write retries
            log.warning("circuit_breaker.record_failed", circuit=transition.circuit, error=f"{type(exc).__name__}: {exc}"[:300])
            return False
        self.writes += 1
        return True
