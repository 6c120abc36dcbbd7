"""Outbox and inbox tables, one pair per service, prefixed with the service name.

Every service keeps its own pair in the same database as its business rows, so a
business change, its outgoing messages and its inbox record commit together. Table
prefixes (not Postgres schemas) keep one code path for SQLite and Postgres.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    insert,
    select,
    text,
    update,
)

from contracts.columns import UtcDateTime

metadata = MetaData()

# SQLite only auto-increments an INTEGER PRIMARY KEY.
Id = BigInteger().with_variant(Integer(), "sqlite")

SERVICES = ("orders", "stock", "payments", "ledger", "saga", "ingest", "dlq")

#: Outboxes that re-send existing messages under their own message id (dead-letter
#: replays): one message may go to several queues, and again after a later failure,
#: so the message id is indexed there but not unique.
RESENDING_SERVICES = frozenset({"dlq"})


@dataclass(frozen=True)
class ServiceTables:
    service: str
    outbox: Table
    inbox: Table
    #: Built once: every unit of work that sends messages runs it.
    outbox_insert: Any = field(init=False, repr=False, compare=False)
    #: Pending rows (correlation id, message id) of the sagas bound as `sagas`.
    pending_of_sagas: Any = field(init=False, repr=False, compare=False)
    #: PostgreSQL only: insert rows given as one array per column (`message_ids`, `types`,
    #: `correlation_ids`, `exchanges`, `routing_keys`, `bodies`, `headers`) with `created_at`
    #: and `dispatch_after`, and read the pending rows of `sagas`, in one statement. Its
    #: read sees the table as before its insert: the sagas' other pending rows.
    insert_then_pending: Any = field(init=False, repr=False, compare=False)
    #: Clear the dispatcher's lease of the rows whose message ids are bound as `ids`.
    unlease: Any = field(init=False, repr=False, compare=False)
    #: The body of the newest row written for the correlation id bound as `correlation_id`.
    newest_body: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "outbox_insert", insert(self.outbox))
        outbox = self.outbox
        pending = select(outbox.c.correlation_id, outbox.c.message_id).where(
            outbox.c.correlation_id.in_(bindparam("sagas", expanding=True)), outbox.c.sent_at.is_(None)
        )
        object.__setattr__(self, "pending_of_sagas", pending)
        name = outbox.name  # one of ours (SERVICES), never input: the only text formatted in
        insert_then_pending = text(
            f"WITH staged AS (INSERT INTO {name} (message_id, type, correlation_id, exchange, routing_key, "  # noqa: S608
            "body, headers, created_at, dispatch_after) "
            "SELECT m, t, c, e, r, b, h, CAST(:created_at AS TIMESTAMPTZ), CAST(:dispatch_after AS TIMESTAMPTZ) "
            "FROM unnest(CAST(:message_ids AS VARCHAR[]), CAST(:types AS VARCHAR[]), CAST(:correlation_ids AS VARCHAR[]), "
            "CAST(:exchanges AS VARCHAR[]), CAST(:routing_keys AS VARCHAR[]), CAST(:bodies AS TEXT[]), "
            "CAST(:headers AS TEXT[])) AS u(m, t, c, e, r, b, h) RETURNING 1) "
            f"SELECT correlation_id, message_id FROM {name} WHERE correlation_id = ANY(CAST(:sagas AS VARCHAR[])) "
            "AND sent_at IS NULL"
        )
        object.__setattr__(self, "insert_then_pending", insert_then_pending)
        unlease = update(outbox).where(outbox.c.message_id.in_(bindparam("ids", expanding=True))).values(dispatch_after=None)
        object.__setattr__(self, "unlease", unlease)
        newest = (
            select(outbox.c.body)
            .where(outbox.c.correlation_id == bindparam("correlation_id"))
            .order_by(outbox.c.id.desc())
            .limit(1)
        )
        object.__setattr__(self, "newest_body", newest)


def _outbox_table(service: str, into: MetaData = metadata) -> Table:
    name = f"{service}_outbox"
    return Table(
        name,
        into,
        Column("id", Id, primary_key=True, autoincrement=True),
        Column("message_id", String(36), nullable=False, unique=service not in RESENDING_SERVICES),
        Column("type", String(64), nullable=False),
        Column("correlation_id", String(64), nullable=False),
        Column("exchange", String(64), nullable=False),
        Column("routing_key", String(128), nullable=False),
        Column("body", Text, nullable=False),
        Column("headers", Text, nullable=False, server_default="{}"),
        Column("created_at", UtcDateTime(), nullable=False),
        Column("sent_at", UtcDateTime(), nullable=True),
        Column(
            "dispatch_after",
            UtcDateTime(),
            nullable=True,
            doc="Leased to the committing process's dispatcher until then; the relay takes the row after (or at once if NULL).",
        ),
        Index(
            f"ix_{name}_pending",
            "id",
            postgresql_where=text("sent_at IS NULL"),
            sqlite_where=text("sent_at IS NULL"),
        ),
        Index(f"ix_{name}_correlation", "correlation_id", "id"),
        # A saga's pending rows: what a unit of work checks before dispatching its own,
        # and what the relay's claim checks for an older leased row. Small: pending only.
        Index(
            f"ix_{name}_pending_correlation",
            "correlation_id",
            "id",
            postgresql_where=text("sent_at IS NULL"),
            sqlite_where=text("sent_at IS NULL"),
        ),
        Index(f"ix_{name}_sent_at", "sent_at"),
        *([Index(f"ix_{name}_message_id", "message_id")] if service in RESENDING_SERVICES else []),
    )


def _inbox_table(service: str) -> Table:
    return inbox_table(f"{service}_inbox", metadata)


def inbox_table(name: str, metadata: MetaData) -> Table:
    """An inbox table named `name` in `metadata`: the shape every compensa inbox has.

    Upstream services that consume compensa events keep theirs in their own database
    (see `producers.sdk.faststream.seen`).
    """
    return Table(
        name,
        metadata,
        Column("consumer", String(64), primary_key=True),
        Column("message_id", String(36), primary_key=True),
        Column("message_type", String(64), nullable=False),
        Column("received_at", UtcDateTime(), nullable=False),
        Column(
            "digest",
            String(64),
            nullable=True,
            doc="sha256 of type, version, correlation id and payload: the same id with other content is refused.",
        ),
        Index(f"ix_{name}_received_at", "received_at"),
    )


TABLES: dict[str, ServiceTables] = {
    service: ServiceTables(service, _outbox_table(service), _inbox_table(service)) for service in SERVICES
}


#: Outbox and inbox tables of the services an application adds (`register_service`): kept
#: apart from compensa's own, which the migrations build, so `compensa db upgrade --app`
#: creates them (and an app that is not loaded adds nothing to compensa's schema).
app_metadata = MetaData()


def register_service(service: str) -> ServiceTables:
    """The outbox and inbox of `service`, an application's participant; made on first use."""
    if service not in TABLES:
        TABLES[service] = ServiceTables(
            service, _outbox_table(service, app_metadata), inbox_table(f"{service}_inbox", app_metadata)
        )
    return TABLES[service]


def tables_for(service: str) -> ServiceTables:
    try:
        return TABLES[service]
    except KeyError:
        raise ValueError(f"unknown service {service!r}; known: {', '.join(TABLES)}") from None
