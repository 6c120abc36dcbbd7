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

Past the greenlet, SQLAlchemy's per-statement machinery (execution context, events,
cursor result) still cost several times what SQLite itself spends on a compensa
statement. `StatementRunner` keeps SQLAlchemy's compiler, compiled cache, bind and
result type processing, and replaces only that machinery: it runs the compiled SQL on
the sqlite3 cursor and hands back a `Result` with the same rows. Statements it does not
cover (Python-side column defaults, RETURNING with executemany, schema translation)
take SQLAlchemy's own path. It uses SQLAlchemy 2.1 internals, hence the pinned minor
version; tests/unit/test_sqlite_facade.py runs every statement shape both ways.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, Result, event
from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine.result import IteratorResult, SimpleResultMetaData
from sqlalchemy.pool import StaticPool
from sqlalchemy.sql import compiler
from sqlalchemy.sql.elements import ClauseElement

from infra.db import configure_sqlite

_MAX_PLANS = 2000


class _Plan:
    """What running one compiled statement needs, worked out once per compiled form."""

    __slots__ = ("compiled", "expanding", "expansions", "keys", "names", "plain", "positions", "processors", "result_processors")

    def __init__(self, compiled: Any, dialect: Any) -> None:
        self.compiled = compiled
        self.positions = tuple(compiled.positiontup or ())
        bind_processors = compiled._bind_processors
        self.processors = tuple(bind_processors.get(name) for name in self.positions)
        #: Expanding IN parameters: the SQL and positions depend on how many values each has.
        self.expanding = tuple(compiled.bind_names[bind] for bind in compiled.post_compile_params)
        #: Value counts -> (SQL, positions, processors, element names per expanding parameter).
        self.expansions: dict[tuple[int, ...], tuple[str, Any, Any, Any]] = {}
        #: Every bind is named by its own key: when the caller gives them all, its
        #: dict is the statement's parameters as they are (what construct_params returns).
        self.names = frozenset(self.positions)
        self.plain = (
            not self.expanding
            and not compiled.escaped_bind_names
            and all(getattr(compiled.binds.get(name), "key", None) == name for name in self.positions)
        )
        columns = compiled._result_columns
        self.keys = tuple(column[0] for column in columns)
        self.result_processors = tuple(column[3]._cached_result_processor(dialect, None) for column in columns)


class _RowsResult(IteratorResult[Any]):
    """An `IteratorResult` that also knows the statement's rowcount, like a cursor result."""

    def __init__(self, metadata: SimpleResultMetaData, rows: list[Any], rowcount: int) -> None:
        super().__init__(metadata, iter(rows))
        self.rowcount = rowcount


class StatementRunner:
    """Run compiled Core statements straight on the sqlite3 cursor (see the module doc)."""

    def __init__(self, engine: Engine) -> None:
        self.dialect = engine.dialect
        self._compiled_cache: dict[Any, Any] = {}
        #: (id(statement), parameter keys, executemany) -> (statement, its compiled form).
        self._compiled_statements: dict[tuple[int, tuple[str, ...], bool], tuple[Any, tuple[Any, Any, Any]]] = {}
        #: id(compiled) -> (compiled, its plan or None when SQLAlchemy must run it).
        self._plans: dict[int, tuple[Any, _Plan | None]] = {}
        self._metadata: dict[tuple[str, ...], SimpleResultMetaData] = {}
        self._linting = self.dialect.compiler_linting | compiler.WARN_LINTING
        self.fast = 0
        self.fallbacks = 0

    def execute(self, sqlite: Any, statement: Any, parameters: Any, autobegin: Callable[[], None]) -> Result[Any] | None:
        """The statement's result, or None when SQLAlchemy's own path must run it."""
        if not isinstance(statement, ClauseElement) or statement._execution_options:  # type: ignore[attr-defined]  # private SQLAlchemy attribute, see issue 14
            return None
        many = isinstance(parameters, list)
        if many and not parameters:
            return None
        first = parameters[0] if many else (parameters or {})
        for_executemany = many and len(parameters) > 1
        compiled, extracted, collected = self._compile(statement, tuple(sorted(first)), for_executemany)
        plan = self._plan(compiled)
        if plan is None or (plan.expanding and for_executemany):
            self.fallbacks += 1
            return None
        autobegin()
        groups = parameters if many else [first]
        sql = compiled.string
        rows_of_parameters = []
        for group, given in enumerate(groups):
            if plan.plain and plan.names <= given.keys():
                values = given
            else:
                values = compiled.construct_params(
                    given, escape_names=False, _group_number=group, extracted_parameters=extracted, _collected_params=collected
                )
            positions, processors = plan.positions, plan.processors
            if plan.expanding:
                sql, positions, processors, values = self._expand(plan, values)
            rows_of_parameters.append(
                tuple(
                    [
                        values[name] if process is None else process(values[name])
                        for name, process in zip(positions, processors, strict=True)
                    ]
                )
            )
        cursor = sqlite.cursor()
        try:
            if for_executemany:
                cursor.executemany(sql, rows_of_parameters)
            else:
                cursor.execute(sql, rows_of_parameters[0])
            description = cursor.description
            raw_rows = cursor.fetchall() if description is not None else []
            rowcount = cursor.rowcount
        except self.dialect.loaded_dbapi.Error as error:
            raise sa_exc.DBAPIError.instance(
                sql, rows_of_parameters, error, self.dialect.loaded_dbapi.Error, dialect=self.dialect
            ) from error
        finally:
            cursor.close()
        self.fast += 1
        if description is not None and len(description) != len(plan.keys):
            # Textual SQL: no typed columns, the cursor names them.
            keys = tuple(column[0] for column in description)
            return _RowsResult(self._metadata_for(keys), raw_rows, rowcount)
        return _RowsResult(self._metadata_for(plan.keys), self._processed(plan, raw_rows), rowcount)

    @staticmethod
    def _expand(plan: _Plan, values: Any) -> tuple[str, Any, Any, Any]:
        """The SQL, positions and values with each IN list spelled out, one bind per element.

        SQLAlchemy renders the same SQL for the same number of elements: it is
        rendered once per count, and later lists only fill in its element names.
        """
        shape = tuple(len(values[name]) for name in plan.expanding)
        known = plan.expansions.get(shape)
        if known is not None:
            sql, positions, processors, element_names = known
            values = dict(values)
            for name in plan.expanding:
                values.update(zip(element_names[name], values[name], strict=True))
            return sql, positions, processors, values
        compiled = plan.compiled
        expanded = compiled._process_parameters_for_postcompile(values)
        all_processors = {**compiled._bind_processors, **expanded.processors}
        processors = tuple(all_processors.get(name) for name in expanded.positiontup)
        element_names = expanded.parameter_expansion
        # Tuples in an IN list expand to several binds each: rendered every time.
        if all(len(element_names.get(name, ())) == count for name, count in zip(plan.expanding, shape, strict=True)):
            plan.expansions[shape] = (expanded.statement, expanded.positiontup, processors, element_names)
        return expanded.statement, expanded.positiontup, processors, expanded.parameters

    def _compile(self, statement: Any, keys: tuple[str, ...], for_executemany: bool) -> tuple[Any, Any, Any]:
        """SQLAlchemy's cached compile, remembered per statement object.

        Statements are immutable and compensa builds its frequent ones once, so the
        cache key SQLAlchemy would derive again on every call is derived once per object.
        """
        memo_key = (id(statement), keys, for_executemany)
        known = self._compiled_statements.get(memo_key)
        if known is not None and known[0] is statement:
            return known[1]
        compiled, extracted, collected, _ = statement._compile_w_cache(
            dialect=self.dialect,
            compiled_cache=self._compiled_cache,
            column_keys=list(keys),
            for_executemany=for_executemany,
            schema_translate_map=None,
            linting=self._linting,
        )
        if len(self._compiled_statements) > _MAX_PLANS:
            self._compiled_statements.clear()
        self._compiled_statements[memo_key] = (statement, (compiled, extracted, collected))
        return compiled, extracted, collected

    def _plan(self, compiled: Any) -> _Plan | None:
        known = self._plans.get(id(compiled))
        if known is not None and known[0] is compiled:
            return known[1]
        if len(self._plans) > _MAX_PLANS:
            # Statements built with ever new shapes: start over rather than grow.
            self._plans.clear()
            self._compiled_cache.clear()
        covered = (
            compiled.positional
            and not compiled.insert_prefetch
            and not compiled.update_prefetch
            and not compiled.literal_execute_params
            and not compiled.schema_translate_map
            and not (compiled.for_executemany and compiled.effective_returning)
        )
        plan = _Plan(compiled, self.dialect) if covered else None
        if plan is not None and len(set(plan.keys)) != len(plan.keys):
            plan = None  # duplicate column names: leave the disambiguation to SQLAlchemy
        self._plans[id(compiled)] = (compiled, plan)
        return plan

    def _metadata_for(self, keys: tuple[str, ...]) -> SimpleResultMetaData:
        metadata = self._metadata.get(keys)
        if metadata is None:
            metadata = self._metadata[keys] = SimpleResultMetaData(keys)
        return metadata

    @staticmethod
    def _processed(plan: _Plan, rows: list[Any]) -> list[Any]:
        processors = plan.result_processors
        if not rows or not any(processors):
            return rows
        return [
            tuple(value if process is None else process(value) for value, process in zip(row, processors, strict=True))
            for row in rows
        ]


class DirectTransaction:
    """`await connection.begin()` or `async with connection.begin():`."""

    def __init__(self, connection: DirectConnection) -> None:
        self._connection = connection
        connection.begin_immediate()

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

    Transactions are the sqlite3 connection's own: BEGIN IMMEDIATE, COMMIT, ROLLBACK
    issued directly. A statement SQLAlchemy runs itself makes its `Connection` believe
    it began one (a no-op on this driver); commit and rollback then go through it, so
    its state and SQLite's never disagree.
    """

    def __init__(self, sync_connection: Connection, on_close: Callable[[], None], runner: StatementRunner | None) -> None:
        self.sync_connection = sync_connection
        sqlite = sync_connection.connection.dbapi_connection
        assert sqlite is not None, "a checked-out connection has its DBAPI connection"
        self._sqlite = sqlite
        self._on_close = on_close
        self._runner = runner
        self._closed = False

    @property
    def dialect(self) -> Any:
        return self.sync_connection.dialect

    def begin(self) -> DirectTransaction:
        return DirectTransaction(self)

    def begin_immediate(self) -> None:
        if self.in_transaction():
            raise sa_exc.InvalidRequestError("a transaction is already begun on this connection")
        # Take the write lock at BEGIN, as every compensa SQLite engine does (infra.db).
        self._sqlite.execute("BEGIN IMMEDIATE")

    def in_transaction(self) -> bool:
        return bool(self._sqlite.in_transaction) or self.sync_connection.in_transaction()

    def _autobegin(self) -> None:
        # Like SQLAlchemy's autobegin: a statement outside a transaction opens one, so
        # nothing is written unless committed.
        if not self._sqlite.in_transaction:
            self._sqlite.execute("BEGIN IMMEDIATE")

    async def execute(self, statement: Any, parameters: Any = None, **kwargs: Any) -> Result[Any]:
        if not kwargs and self._runner is not None:
            result = self._runner.execute(self._sqlite, statement, parameters, self._autobegin)
            if result is not None:
                return result
        self._autobegin()
        return self.sync_connection.execute(statement, parameters, **kwargs)

    async def exec_driver_sql(self, statement: str, parameters: Any = None, **kwargs: Any) -> Result[Any]:
        self._autobegin()
        return self.sync_connection.exec_driver_sql(statement, parameters, **kwargs)

    async def scalar(self, statement: Any, parameters: Any = None, **kwargs: Any) -> Any:
        return (await self.execute(statement, parameters, **kwargs)).scalar()

    async def run_sync(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self._autobegin()
        return function(self.sync_connection, *args, **kwargs)

    async def commit(self) -> None:
        if self.sync_connection.in_transaction():
            self.sync_connection.commit()
        else:
            self._sqlite.commit()

    async def rollback(self) -> None:
        if self.sync_connection.in_transaction():
            self.sync_connection.rollback()
        else:
            self._sqlite.rollback()

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
            self._connection.begin_immediate()
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

    def __init__(self, sync_engine: Engine, *, runner: bool = True) -> None:
        self.sync_engine = sync_engine
        self._connection: Connection | None = None
        self._checked_out = False
        #: None: every statement takes SQLAlchemy's own path (to compare the two).
        self.runner = StatementRunner(sync_engine) if runner else None

    def checkout(self) -> DirectConnection:
        # There is one sqlite3 connection: a second checkout inside a unit of work
        # would end that unit's transaction under it.
        if self._checked_out:
            raise RuntimeError("the simulator's SQLite engine serves one connection at a time; close the open one first")
        if self._connection is None or self._connection.closed:
            self._connection = self.sync_engine.connect()
        connection = DirectConnection(self._connection, self._checked_in, self.runner)
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


def create_direct_sqlite_engine(path: str, *, statement_runner: bool = True, throwaway: bool = False) -> DirectEngine:
    """A single-threaded SQLite database at `path` (WAL, no fsync, one writer).

    `throwaway`: a file nobody else opens and nobody keeps after the run. The engine
    then holds SQLite's file lock for its life (no shared-memory locking in every
    transaction) and keeps the rollback journal in memory instead of a WAL, which
    halves what a commit costs. A crash can leave such a file unusable, which for a
    throwaway file is no loss; rollback works as ever.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # One connection, reused: there is only ever one caller.
    engine = create_sync_engine(f"sqlite:///{path}", poolclass=StaticPool)

    # No need to wait for the disk: a simulation's database is rebuilt by running it
    # again. Transactions begin in DirectConnection, with the same BEGIN IMMEDIATE.
    configure_sqlite(engine, synchronous="OFF", begin_immediate=False)
    if throwaway:

        @event.listens_for(engine, "connect")
        def _throwaway(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.execute("PRAGMA locking_mode=EXCLUSIVE")
            dbapi_connection.execute("PRAGMA journal_mode=MEMORY")

    return DirectEngine(engine, runner=statement_runner)
