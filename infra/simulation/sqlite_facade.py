"""An AsyncEngine look-alike over SQLAlchemy's synchronous SQLite engine, for the simulator.

The simulator runs one delivery at a time on one thread, on purpose (determinism).
There, SQLAlchemy's asyncio layer only costs: every statement hops through a greenlet
and an adapted DBAPI cursor, which made a trivial transaction three to four times
dearer than the synchronous engine doing the same work. This facade offers the part of
the `AsyncEngine`/`AsyncConnection` API that compensa's code uses (connect, begin,
execute, commit, rollback, run_sync, ...) and runs each call synchronously on the
calling thread, on one `sqlalchemy.Connection` kept open for the run. Statements,
dialect (SQLite on the stdlib sqlite3 driver), types, transactions and results are
SQLAlchemy's own, through its public API only: the handlers, orchestrator and relay
run unchanged on it, and tests/unit/test_sqlite_facade.py checks that it answers like
the aiosqlite engine production uses.

Never use it where several tasks share the database concurrently: a call blocks the
event loop until SQLite answers, which is what a single-threaded simulation wants and
what a service must not do.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, Result, event
from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy.pool import StaticPool

from infra.db import configure_sqlite

#: Compiled statements kept by the engine. compensa runs a few hundred statement
#: shapes; more room than SQLAlchemy's default (500) keeps every one compiled once.
COMPILED_CACHE_SIZE = 2000


class DirectTransaction:
    """`await connection.begin()` or `async with connection.begin():`."""

    def __init__(self, connection: DirectConnection) -> None:
        self._connection = connection
        connection.sync_connection.begin()

    def __await__(self) -> Generator[Any, None, DirectTransaction]:
        return self._itself().__await__()

    async def _itself(self) -> DirectTransaction:
        return self

    async def __aenter__(self) -> DirectTransaction:
        return self

    async def __aexit__(self, exc_type: object, *_: object) -> None:
        await self._connection.end(succeeded=exc_type is None)


class DirectConnection:
    """One checkout of the engine's single connection.

    Transactions are SQLAlchemy's: a statement outside one begins it (autobegin), and
    every BEGIN is a BEGIN IMMEDIATE (infra.db.configure_sqlite), as on every compensa
    SQLite engine.
    """

    def __init__(self, sync_connection: Connection, on_close: Callable[[], None]) -> None:
        self.sync_connection = sync_connection
        self._on_close = on_close
        self._closed = False

    @property
    def dialect(self) -> Any:
        return self.sync_connection.dialect

    def begin(self) -> DirectTransaction:
        return DirectTransaction(self)

    def in_transaction(self) -> bool:
        return self.sync_connection.in_transaction()

    async def execute(self, statement: Any, parameters: Any = None, **kwargs: Any) -> Result[Any]:
        return self.sync_connection.execute(statement, parameters, **kwargs)

    async def exec_driver_sql(self, statement: str, parameters: Any = None, **kwargs: Any) -> Result[Any]:
        return self.sync_connection.exec_driver_sql(statement, parameters, **kwargs)

    async def scalar(self, statement: Any, parameters: Any = None, **kwargs: Any) -> Any:
        return self.sync_connection.scalar(statement, parameters, **kwargs)

    async def run_sync(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return function(self.sync_connection, *args, **kwargs)

    async def commit(self) -> None:
        self.sync_connection.commit()

    async def rollback(self) -> None:
        self.sync_connection.rollback()

    async def end(self, *, succeeded: bool) -> None:
        """End the open transaction, if any: commit it if its block succeeded, else roll back."""
        if not self.in_transaction():
            return
        if succeeded:
            await self.commit()
        else:
            await self.rollback()

    async def close(self) -> None:
        """Roll back what was not committed and hand the connection back (it stays open)."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.end(succeeded=False)
        finally:
            self._on_close()

    async def __aenter__(self) -> DirectConnection:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()


class _Connecting:
    """`await engine.connect()` or `async with engine.connect() as connection:`."""

    def __init__(self, engine: DirectEngine) -> None:
        self._connection = engine.checkout()

    def __await__(self) -> Generator[Any, None, DirectConnection]:
        return self._connected().__await__()

    async def _connected(self) -> DirectConnection:
        return self._connection

    async def __aenter__(self) -> DirectConnection:
        return self._connection

    async def __aexit__(self, *_: object) -> None:
        await self._connection.close()


class _Beginning:
    """`async with engine.begin() as connection:` commits on success, rolls back on error."""

    def __init__(self, engine: DirectEngine) -> None:
        self._engine = engine
        self._connection: DirectConnection | None = None

    async def __aenter__(self) -> DirectConnection:
        self._connection = self._engine.checkout()
        try:
            self._connection.sync_connection.begin()
        except BaseException:
            await self._connection.close()
            raise
        return self._connection

    async def __aexit__(self, exc_type: object, *_: object) -> None:
        assert self._connection is not None
        try:
            await self._connection.end(succeeded=exc_type is None)
        finally:
            await self._connection.close()


class DirectEngine:
    """The `AsyncEngine` calls compensa makes, served by one synchronous connection."""

    def __init__(self, sync_engine: Engine) -> None:
        self.sync_engine = sync_engine
        self._connection: Connection | None = None
        self._checked_out = False

    def checkout(self) -> DirectConnection:
        # There is one sqlite3 connection: a second checkout inside a unit of work
        # would end that unit's transaction under it.
        if self._checked_out:
            raise RuntimeError("the simulator's SQLite engine serves one connection at a time; close the open one first")
        if self._connection is None or self._connection.closed:
            self._connection = self.sync_engine.connect()
        connection = DirectConnection(self._connection, self._checked_in)
        self._checked_out = True
        return connection

    def _checked_in(self) -> None:
        self._checked_out = False

    @property
    def dialect(self) -> Any:
        return self.sync_engine.dialect

    @property
    def url(self) -> Any:
        return self.sync_engine.url

    def connect(self) -> _Connecting:
        return _Connecting(self)

    def begin(self) -> _Beginning:
        return _Beginning(self)

    async def dispose(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        self.sync_engine.dispose()


def create_direct_sqlite_engine(path: str, *, throwaway: bool = False) -> DirectEngine:
    """A single-threaded SQLite database at `path` (WAL, no fsync, one writer).

    `throwaway`: a file nobody else opens and nobody keeps after the run. The engine
    then holds SQLite's file lock for its life (no shared-memory locking in every
    transaction) and keeps the rollback journal in memory instead of a WAL, which
    halves what a commit costs. A crash can leave such a file unusable, which for a
    throwaway file is no loss; rollback works as ever.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # One connection, reused: there is only ever one caller.
    engine = create_sync_engine(f"sqlite:///{path}", poolclass=StaticPool, query_cache_size=COMPILED_CACHE_SIZE)

    # No need to wait for the disk: a simulation's database is rebuilt by running it again.
    configure_sqlite(engine, synchronous="OFF")
    if throwaway:

        @event.listens_for(engine, "connect")
        def _throwaway(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.execute("PRAGMA locking_mode=EXCLUSIVE")
            dbapi_connection.execute("PRAGMA journal_mode=MEMORY")

    return DirectEngine(engine)
