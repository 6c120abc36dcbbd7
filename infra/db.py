"""Database engines from a URL: SQLite (embedded default) or Postgres, the same code."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE a database error carries (asyncpg: on the error or its cause), if any."""
    orig = getattr(exc, "orig", None)
    for source in (orig, getattr(orig, "__cause__", None)):
        code = getattr(source, "sqlstate", None) or getattr(source, "pgcode", None)
        if code:
            return str(code)
    return None


def create_engine(
    url: str, *, pool_size: int = 10, echo: bool = False, pre_ping: bool = False, pooled: bool = True
) -> AsyncEngine:
    """Create an async engine; on SQLite turn on WAL and a busy timeout.

    `pre_ping` tests each pooled PostgreSQL connection before use. On asyncpg that is
    BEGIN, an empty query and ROLLBACK: three round trips per checkout, as many as the
    work of a small transaction. Consumers, relays and sweepers go without it: after a
    server restart the first statement on a dead connection fails, SQLAlchemy discards
    the pool's connections, and the pipeline runs the delivery again at once (relays and
    sweepers retry on their next turn). The HTTP API keeps it: a client would see that error.

    `pooled=False` opens a connection per use and keeps none: for rare writes (a circuit
    breaker's transitions) by an engine nobody disposes.
    """
    parsed = make_url(url)
    pool: dict[str, Any] = {} if pooled else {"poolclass": NullPool}
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, echo=echo, connect_args={"timeout": 30}, **pool)
        configure_sqlite(engine.sync_engine, synchronous="NORMAL")
        return engine
    if parsed.get_backend_name() == "postgresql":
        if not pooled:
            return create_async_engine(url, echo=echo, **pool)
        return create_async_engine(url, echo=echo, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=pre_ping)
    raise ValueError(
        f"unsupported database URL {parsed.render_as_string(hide_password=True)!r}: "
        "use sqlite+aiosqlite:///path or postgresql+asyncpg://user@host/db"
    )


def configure_sqlite(sync_engine: Engine, *, synchronous: str, begin_immediate: bool = True) -> None:
    """WAL, foreign keys, a busy timeout, and the write lock taken at BEGIN, on every connection.

    `begin_immediate=False` leaves BEGIN to the caller (the simulator's engine issues it).
    """

    @event.listens_for(sync_engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when a transaction begins.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    if not begin_immediate:
        return

    @event.listens_for(sync_engine, "begin")
    def _begin_immediate(connection: Connection) -> None:
        # Take the write lock at BEGIN: reads inside a unit of work then see the
        # rows they will write, and SQLite has exactly one writer at a time.
        connection.exec_driver_sql("BEGIN IMMEDIATE")


@asynccontextmanager
async def scratch_database(server_url: str, prefix: str = "compensa_scratch") -> AsyncIterator[str]:
    """An empty database on the same PostgreSQL server, dropped afterwards; yields its URL.

    `server_url` names any database the role can connect to; the new one sits beside it.
    """
    url = make_url(server_url)
    name = f"{prefix}_{uuid.uuid4().hex[:8]}".lower()
    # No pool: a server restart in between must not leave DROP DATABASE a dead connection.
    admin = create_async_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        async with admin.connect() as connection:
            await connection.execute(text(f'CREATE DATABASE "{name}"'))
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        try:
            async with admin.connect() as connection:
                await connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        finally:
            await admin.dispose()
