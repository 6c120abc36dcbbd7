"""Group commit into the outbox: requests that arrive while a commit runs share the next one.

Each request still waits for the commit that holds its rows before it answers, so
"committed before 202" holds; what changes is that fifty concurrent requests cost a
few commits instead of fifty. The rows go in as one multi-row INSERT, a transaction of
its own in autocommit mode. A failed commit fails every request in it (503, nothing
of theirs was accepted); an id already in the outbox is skipped (a retry after a
crash), so one request's duplicate never fails its neighbours. One commit runs at a
time, so rows leave in arrival order, which keeps each saga's events in order.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import Table
from sqlalchemy.ext.asyncio import AsyncEngine

from outbox.uow import insert_ignoring_duplicates


class OutboxWriter:
    def __init__(self, engine: AsyncEngine, table: Table, *, max_rows: int = 1000) -> None:
        self.engine = engine
        self.table = table
        self.max_rows = max_rows
        self._pending: list[tuple[list[dict[str, Any]], asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self.commits = 0

    async def write(self, rows: list[dict[str, Any]]) -> None:
        """Return once `rows` are committed (all of them, in one transaction); raise if that failed."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((rows, done))
        if self._flusher is None or self._flusher.done():
            # Its own task: a request that goes away cannot cancel a commit others wait for.
            self._flusher = asyncio.create_task(self._flush())
        await asyncio.shield(done)

    def _take(self) -> list[tuple[list[dict[str, Any]], asyncio.Future[None]]]:
        taken, count = [], 0
        while self._pending and (not taken or count + len(self._pending[0][0]) <= self.max_rows):
            item = self._pending.pop(0)
            taken.append(item)
            count += len(item[0])
        return taken

    async def _flush(self) -> None:
        while self._pending:
            batch = self._take()
            rows = [row for item_rows, _ in batch for row in item_rows]
            try:
                await self._insert(rows)
            except BaseException as exc:  # noqa: BLE001 - handed to every waiting request
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            self.commits += 1
            for _, done in batch:
                if not done.done():
                    done.set_result(None)

    async def _insert(self, rows: list[dict[str, Any]]) -> None:
        if len(rows) <= self.max_rows:
            async with self.engine.connect() as connection:
                # One multi-row INSERT in autocommit: atomic on its own (all rows or
                # none), one round trip instead of BEGIN, INSERT, COMMIT.
                autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
                await autocommit.execute(insert_ignoring_duplicates(autocommit, self.table).values(rows))
            return
        # One request larger than a statement may bind: several statements, one transaction.
        async with self.engine.begin() as connection:
            for start in range(0, len(rows), self.max_rows):
                chunk = rows[start : start + self.max_rows]
                await connection.execute(insert_ignoring_duplicates(connection, self.table).values(chunk))
