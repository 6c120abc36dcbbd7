"""The unit of work: one database transaction holding business rows, outbox and inbox."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import structlog
from opentelemetry import context as otel_context
from sqlalchemy import Table, bindparam, delete, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from contracts import ContractError, Message, Payload, encode, new_message
from contracts.clock import Clock
from contracts.routing import exchange_for
from outbox.dispatch import Dispatcher
from outbox.ports import OutgoingMessage
from outbox.tables import ServiceTables, tables_for
from outbox.tracing import context_from, creation_traceparent

log = structlog.get_logger("compensa.outbox")

_IGNORING_INSERTS: dict[tuple[str, str], Any] = {}


def insert_for(dialect: str, table: Any) -> Any:
    """An INSERT with the dialect's ON CONFLICT clauses (PostgreSQL and SQLite both have them)."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as postgresql_insert

        return postgresql_insert(table)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table)


def insert_ignoring_duplicates(connection: AsyncConnection, table: Any) -> Any:
    """Return an INSERT that skips rows whose key exists (both backends speak ON CONFLICT).

    Built once per dialect and table: statement construction costs more than running it.
    """
    key = (connection.dialect.name, table.name)
    statement = _IGNORING_INSERTS.get(key)
    if statement is None:
        statement = _IGNORING_INSERTS[key] = insert_for(connection.dialect.name, table).on_conflict_do_nothing()
    return statement


def content_digest(message: Message[Any]) -> str:
    """What makes two deliveries of one message id the same message (not when or by whom it was sent)."""
    envelope = message.envelope
    canonical = json.dumps(
        [envelope.type, envelope.version, envelope.correlation_id, envelope.payload],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


_STORED_DIGESTS: dict[Table, Any] = {}


def _stored_digest(inbox: Table) -> Any:
    """The digest a message id was recorded with, by `consumer` and `message_id`: built once per inbox."""
    query = _STORED_DIGESTS.get(inbox)
    if query is None:
        query = _STORED_DIGESTS[inbox] = select(inbox.c.digest).where(
            inbox.c.consumer == bindparam("consumer"), inbox.c.message_id == bindparam("message_id")
        )
    return query


async def record_in_inbox(
    connection: AsyncConnection, inbox: Table, consumer: str, message: Message[Any], received_at: datetime
) -> bool:
    """Insert `(consumer, message_id)` into `inbox` in the connection's transaction; True if it was there.

    Raise ContractError when the id was recorded with other content: a producer reused
    a message id, and skipping it as a duplicate would lose it silently.
    """
    digest = content_digest(message)
    result = await connection.execute(
        insert_ignoring_duplicates(connection, inbox),
        {
            "consumer": consumer,
            "message_id": str(message.message_id),
            "message_type": message.type,
            "received_at": received_at,
            "digest": digest,
        },
    )
    if result.rowcount != 0:
        return False
    stored = (
        await connection.execute(_stored_digest(inbox), {"consumer": consumer, "message_id": str(message.message_id)})
    ).scalar_one_or_none()
    if stored is not None and stored != digest:
        raise ContractError(
            f"message id {message.message_id} was already processed with other content "
            "(a reused message id): refused, not skipped"
        )
    return True


def outbox_row(
    message: Message[Any],
    now: datetime,
    exchange: str | None = None,
    routing_key: str | None = None,
    *,
    dispatch_after: datetime | None = None,
) -> dict[str, Any]:
    """The outbox row of a message: to its kind's exchange under its type, unless told otherwise.

    `dispatch_after` leases the row to the committing process's dispatcher: the relay
    leaves it alone until then.
    """
    envelope = message.envelope
    headers = {"traceparent": envelope.traceparent} if envelope.traceparent else {}
    return {
        "message_id": str(envelope.message_id),
        "type": envelope.type,
        "correlation_id": envelope.correlation_id,
        "exchange": exchange_for(type(message.payload).kind) if exchange is None else exchange,
        "routing_key": envelope.type if routing_key is None else routing_key,
        "body": encode(envelope).decode(),
        "headers": json.dumps(headers),
        "created_at": now,
        "dispatch_after": dispatch_after,
    }


def outgoing_from_row(row: dict[str, Any]) -> OutgoingMessage:
    return OutgoingMessage(
        message_id=row["message_id"],
        type=row["type"],
        correlation_id=row["correlation_id"],
        exchange=row["exchange"],
        routing_key=row["routing_key"],
        body=row["body"].encode(),
        headers=json.loads(row["headers"]),
    )


class UnitOfWork:
    """Open a transaction; stage outgoing messages; write them with the business change.

    ``async with UnitOfWork(...) as uow: ...; await uow.commit()``. Leaving the block
    without commit rolls everything back, outgoing messages included.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        service: str,
        clock: Clock,
        *,
        incoming: Message[Any] | None = None,
        message_ids: Callable[[], uuid.UUID] | None = None,
        dispatcher: Dispatcher | None = None,
    ) -> None:
        self.engine = engine
        #: Publishes this unit's messages right after commit; None leaves them to the relay.
        self.dispatcher = dispatcher
        self._dispatching: list[dict[str, Any]] = []
        self._grant: int | None = None
        #: Set when a flush found a saga's older row not on its way: no lease for this unit.
        self._unleased = False
        self._message_ids = message_ids
        self.tables: ServiceTables = tables_for(service)
        self.service = service
        self.clock = clock
        self.incoming = incoming
        self._pending: list[Message[Any]] = []
        #: Index in _pending -> (exchange, routing key) for messages routed by hand.
        self._routes: dict[int, tuple[str | None, str | None]] = {}
        self._connection: AsyncConnection | None = None
        self.committed = False
        self._after_commit: list[Callable[[], None]] = []

    @property
    def connection(self) -> AsyncConnection:
        if self._connection is None:
            raise RuntimeError("unit of work used outside `async with`")
        return self._connection

    async def __aenter__(self) -> UnitOfWork:
        self._connection = await self.engine.connect()
        await self._connection.begin()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        connection = self._connection
        self._connection = None
        if connection is None:
            return
        try:
            if not self.committed and connection.in_transaction():
                await connection.rollback()
        finally:
            await connection.close()

    def now(self) -> datetime:
        return self.clock.now()

    def send(
        self,
        payload: Payload,
        *,
        correlation_id: str | None = None,
        message_id: uuid.UUID | None = None,
    ) -> Message[Any]:
        """Stage a message; it is written to the outbox at commit, never published here."""
        if correlation_id is None:
            if self.incoming is None:
                raise ValueError("correlation_id is required outside a message handler")
            correlation_id = self.incoming.correlation_id
        message_id = message_id or (self._message_ids() if self._message_ids else uuid.uuid4())
        traceparent = creation_traceparent(
            payload.message_type,
            exchange_for(payload.kind),
            str(message_id),
            correlation_id,
            parent=self.incoming.envelope.traceparent if self.incoming else None,
        )
        message = new_message(
            payload,
            correlation_id=correlation_id,
            producer=self.service,
            causation_id=self.incoming.message_id if self.incoming else None,
            traceparent=traceparent,
            occurred_at=self.now(),
            message_id=message_id,
        )
        self._pending.append(message)
        return message

    def add(self, message: Message[Any], *, exchange: str | None = None, routing_key: str | None = None) -> None:
        """Stage an already-built message (replays, SDK publishes).

        `exchange`/`routing_key` override where it goes: `exchange=""` (the default
        exchange) with `routing_key=<queue>` delivers it to that one queue only.
        """
        if exchange is not None or routing_key is not None:
            self._routes[len(self._pending)] = (exchange, routing_key)
        self._pending.append(message)

    @property
    def pending(self) -> tuple[Message[Any], ...]:
        return tuple(self._pending)

    async def seen(self, consumer: str, message: Message[Any]) -> bool:
        """Record the message in the inbox; return True when it was already there.

        Raise ContractError when its id was recorded with other content: a producer
        reused a message id, and skipping it as a duplicate would lose it silently.
        """
        return await record_in_inbox(self.connection, self.tables.inbox, consumer, message, self.now())

    async def flush_outbox(self) -> None:
        """Write the staged messages to the outbox; leased to the dispatcher when it may
        publish them after commit (see outbox/dispatch.py), else left to the relay."""
        if not self._pending:
            return
        now = self.now()
        dispatcher = self.dispatcher
        lease = dispatcher.lease_until(now) if dispatcher is not None and dispatcher.in_use and not self._unleased else None
        rows = [
            outbox_row(message, now, *self._routes.get(index, (None, None)), dispatch_after=lease)
            for index, message in enumerate(self._pending)
        ]
        self._pending.clear()
        self._routes.clear()
        if dispatcher is None or lease is None:
            await self.connection.execute(self.tables.outbox_insert, rows)
            return
        sagas = sorted({row["correlation_id"] for row in rows})
        if self.connection.dialect.name == "postgresql":
            # Insert and read the sagas' pending rows in one round trip.
            pending = (await self.connection.execute(self.tables.insert_then_pending, _as_columns(rows, now, lease, sagas))).all()
        else:
            await self.connection.execute(self.tables.outbox_insert, rows)
            pending = (await self.connection.execute(self.tables.pending_of_sagas, {"sagas": sagas})).all()
        own = {row["message_id"] for row in (*self._dispatching, *rows)}
        grant = dispatcher.may_dispatch((p.correlation_id, p.message_id) for p in pending if p.message_id not in own)
        if grant is None:
            # An older row of one of these sagas is not on its way through this dispatcher
            # (rare): the relay publishes all of this unit's rows behind it, in id order.
            unleased = [row["message_id"] for row in (*self._dispatching, *rows)]
            await self.connection.execute(self.tables.unlease, {"ids": unleased})
            self._dispatching.clear()
            self._unleased = True
            return
        # The first grant counts: a publish that failed since voids it (see Dispatcher.submit).
        self._grant = grant if self._grant is None else self._grant
        self._dispatching.extend(rows)

    async def trace_context_of(self, correlation_id: str) -> otel_context.Context | None:
        """The trace context of the newest message this service wrote for `correlation_id`.

        How work started by no message (a deadline firing, an operator's action) rejoins
        its saga's trace. None when no row is kept (pruned) or the message carried no trace.
        """
        body = (await self.connection.execute(self.tables.newest_body, {"correlation_id": correlation_id})).scalar()
        if body is None:
            return None
        try:
            traceparent = json.loads(body).get("traceparent")
        except (ValueError, AttributeError):
            return None
        return context_from(traceparent) if isinstance(traceparent, str) and traceparent else None

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run `callback` once this unit has committed; never if it rolls back.

        For what must count only what really happened (metrics): a batch that rolls back
        and is reprocessed message by message must not be counted twice.
        """
        self._after_commit.append(callback)

    async def commit(self) -> None:
        await self.flush_outbox()
        await self.connection.commit()
        self.committed = True
        if self._dispatching:
            assert self.dispatcher is not None
            assert self._grant is not None
            self.dispatcher.submit([outgoing_from_row(row) for row in self._dispatching], self._grant)
            self._dispatching.clear()
        callbacks, self._after_commit = self._after_commit, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("uow.after_commit_failed", callback=repr(callback))


def _as_columns(rows: list[dict[str, Any]], now: datetime, lease: datetime, sagas: list[str]) -> dict[str, Any]:
    """Parameters of `ServiceTables.insert_then_pending`: one array per column."""
    return {
        "message_ids": [row["message_id"] for row in rows],
        "types": [row["type"] for row in rows],
        "correlation_ids": [row["correlation_id"] for row in rows],
        "exchanges": [row["exchange"] for row in rows],
        "routing_keys": [row["routing_key"] for row in rows],
        "bodies": [row["body"] for row in rows],
        "headers": [row["headers"] for row in rows],
        "created_at": now,
        "dispatch_after": lease,
        "sagas": sagas,
    }


#: What a consumer runs for a message: change rows and stage messages on the unit of work.
Handler = Callable[[UnitOfWork, Message[Any]], Awaitable[None]]


async def prune(
    engine: AsyncEngine, service: str, *, now: datetime, outbox_age: timedelta, inbox_age: timedelta
) -> tuple[int, int]:
    """Delete sent outbox rows and inbox rows older than their retention."""
    tables = tables_for(service)
    async with engine.begin() as connection:
        sent = await connection.execute(
            delete(tables.outbox).where(tables.outbox.c.sent_at.is_not(None), tables.outbox.c.sent_at < now - outbox_age)
        )
        seen = await connection.execute(delete(tables.inbox).where(tables.inbox.c.received_at < now - inbox_age))
    return sent.rowcount, seen.rowcount


async def pending_summary(engine: AsyncEngine, service: str, now: datetime) -> dict[str, Any]:
    """Count pending outbox rows and the age of the oldest one (relay lag)."""
    from sqlalchemy import func

    outbox = tables_for(service).outbox
    async with engine.connect() as connection:
        row = (
            await connection.execute(select(func.count(), func.min(outbox.c.created_at)).where(outbox.c.sent_at.is_(None)))
        ).one()
    count, oldest = row
    return {
        "service": service,
        "pending": int(count),
        "oldest_pending_age_seconds": (now - oldest).total_seconds() if oldest else 0.0,
    }
