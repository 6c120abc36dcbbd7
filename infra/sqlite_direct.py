"""An AsyncEngine look-alike over SQLAlchemy's synchronous SQLite engine, for the simulator.

The simulator runs one delivery at a time on one thread, on purpose (determinism).
There, SQLAlchemy's asyncio layer only costs: every statement hops through a greenlet
and an adapted DBAPI cursor, which made a trivial transaction three to four times
dearer than the synchronous engine doing the same work. This facade offers the part of
the `AsyncEngine`/`AsyncConnection` API that compensa's code uses (connect, begin,
execute, commit, rollback, run_sync, ...) and runs each call synchronously on the
calling thread. Statements, dialect (SQLite), types and results are SQLAlchemy's own:
the handlers, orchestrator and relay run unchanged on it.

Never use it where several tasks share the database concurrently: a call blocks the
event loop until SQLite answers, which is what a single-threaded simulation wants and
what a service must not do.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, Result
from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy.pool import StaticPool

from infra.db import configure_sqlite


class DirectTransaction:
    """`await connection.begin()` or `async with connection.begin():`."""

    def __init__(self, connection: DirectConnection) -> None:
        self._connection = connection
        self._transaction = connection.sync_connection.begin()

    def __await__(self) -> Generator[Any, None, DirectTransaction]:
        return self._itself().__await__()

    async def _itself(self) -> DirectTransaction:
        return self

    async def __aenter__(self) -> DirectTransaction:
        return self

    async def __aexit__(self, exc_type: object, *_: object) -> None:
        if not self._transaction.is_active:
            return
        if exc_type is None:
            self._transaction.commit()
        else:
            self._transaction.rollback()


class DirectConnection:
    def __init__(self, sync_connection: Connection, on_close: Callable[[], None]) -> None:
        self.sync_connection = sync_connection
        self._on_close = on_close

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

    async def close(self) -> None:
        if not self.sync_connection.closed:
            self.sync_connection.close()
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
        connection = self._connection.sync_connection
        try:
            if connection.in_transaction():
                if exc_type is None:
                    connection.commit()
                else:
                    connection.rollback()
        finally:
            await self._connection.close()


class DirectEngine:
    """The `AsyncEngine` calls compensa makes, served by a synchronous engine."""

    def __init__(self, sync_engine: Engine) -> None:
        self.sync_engine = sync_engine
        self._checked_out = False

    def checkout(self) -> DirectConnection:
        # Every connection shares one sqlite3 connection (StaticPool): a second one
        # opened inside a unit of work would end that unit's transaction under it.
        if self._checked_out:
            raise RuntimeError("the simulator's SQLite engine serves one connection at a time; close the open one first")
        connection = DirectConnection(self.sync_engine.connect(), self._checked_in)
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
        self.sync_engine.dispose()


def create_direct_sqlite_engine(path: str) -> DirectEngine:
    """A throwaway single-threaded SQLite database at `path` (WAL, no fsync, one writer)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # One connection, reused: there is only ever one caller.
    engine = create_sync_engine(f"sqlite:///{path}", poolclass=StaticPool)

    # A throwaway file: no need to wait for the disk.
    configure_sqlite(engine, synchronous="OFF")
    return DirectEngine(engine)
