"""Group commit into the outbox: requests that arrive while a commit runs share the next one.

Each request still waits for the commit that holds its rows before it answers, so
"committed before 202" holds; what changes is that fifty concurrent requests cost a
few commits instead of fifty. The rows go in as one multi-row INSERT, a transaction of
its own in autocommit mode. One commit runs at a time, so rows leave in arrival order,
which keeps each saga's events in order. An id already in the outbox is skipped (a
retry after a crash), so one request's duplicate never fails its neighbours.

A failed commit is told apart by its cause. The database being unavailable fails
every request in it (503, nothing of theirs was accepted). The database refusing
what a row holds (a data exception or a constraint: SQLSTATE class 22 or 23) is one
request's fault, not its neighbours': each request's rows are then inserted on their
own, so the valid ones commit and only the offending request fails, with
`RowsRefused`. Requests are validated before they get here; this is the backstop.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from sqlalchemy import Table
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts import ContractError
from outbox.uow import insert_ignoring_duplicates

log = structlog.get_logger("compensa.ingest")

_Pending = tuple[list[dict[str, Any]], asyncio.Future[None]]


class RowsRefused(ContractError):
    """The database refused this request's rows for what they hold; retrying cannot help."""


def refused_for_data(exc: BaseException) -> bool:
    """True when `exc` is the database refusing the rows' content, not the database being unavailable."""
    if isinstance(exc, (DataError, IntegrityError)):
        return True
    if isinstance(exc, DBAPIError) and not exc.connection_invalidated:
        state = getattr(exc.orig, "sqlstate", None) or getattr(getattr(exc.orig, "__cause__", None), "sqlstate", None)
        return isinstance(state, str) and state[:2] in ("22", "23")
    # Text a driver cannot encode (a lone surrogate) fails before anything is sent.
    return isinstance(exc, UnicodeError)


def _reason(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    state = getattr(orig, "sqlstate", None)
    first = (str(orig).splitlines() or [type(orig).__name__])[0][:200]
    text = f"the database refused this request's data ({'SQLSTATE ' + state + ': ' if state else ''}{first})"
    # The message may quote the refused value: keep it printable and encodable.
    return text.encode("ascii", "backslashreplace").decode("ascii")


class OutboxWriter:
    def __init__(self, engine: AsyncEngine, table: Table, *, max_rows: int = 1000) -> None:
        self.engine = engine
        self.table = table
        self.max_rows = max_rows
        self._pending: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None
        self.commits = 0

    async def write(self, rows: list[dict[str, Any]]) -> None:
        """Return once `rows` are committed (all of them, in one transaction); raise if that failed.

        Raise `RowsRefused` when the database refuses these rows' content (their
        neighbours in the shared commit are committed without them).
        """
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((rows, done))
        if self._flusher is None or self._flusher.done():
            # Its own task: a request that goes away cannot cancel a commit others wait for.
            self._flusher = asyncio.create_task(self._flush())
        await asyncio.shield(done)

    def _take(self) -> list[_Pending]:
        taken: list[_Pending] = []
        count = 0
        while self._pending and (not taken or count + len(self._pending[0][0]) <= self.max_rows):
            item = self._pending.pop(0)
            taken.append(item)
            count += len(item[0])
        return taken

    async def _flush(self) -> None:
        while self._pending:
            batch = self._take()
            try:
                await self._insert([row for item_rows, _ in batch for row in item_rows])
            except Exception as exc:  # noqa: BLE001 - handed to the waiting requests
                if not refused_for_data(exc):
                    _fail(batch, exc)
                elif len(batch) == 1:
                    _fail(batch, RowsRefused(_reason(exc)))
                else:
                    log.warning("ingest.commit_split", requests=len(batch), reason=_reason(exc))
                    await self._one_by_one(batch)
                continue
            except BaseException as exc:  # cancelled: nobody may wait forever
                _fail(batch, exc)
                raise
            self.commits += 1
            _succeed(batch)

    async def _one_by_one(self, batch: list[_Pending]) -> None:
        """Insert each request's rows on its own, in arrival order; fail only the ones refused."""
        for position, item in enumerate(batch):
            try:
                await self._insert(item[0])
            except Exception as exc:  # noqa: BLE001 - handed to this request
                if not refused_for_data(exc):
                    # Unavailable now: the rest would wait for the same failure one by one.
                    _fail(batch[position:], exc)
                    return
                _fail([item], RowsRefused(_reason(exc)))
                continue
            except BaseException as exc:
                _fail(batch[position:], exc)
                raise
            self.commits += 1
            _succeed([item])

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


def _fail(items: list[_Pending], exc: BaseException) -> None:
    for _, done in items:
        if not done.done():
            done.set_exception(exc)


def _succeed(items: list[_Pending]) -> None:
    for _, done in items:
        if not done.done():
            done.set_result(None)
