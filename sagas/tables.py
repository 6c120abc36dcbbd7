"""Saga tables an operator can query: instances (with their active deadline) and the history of every transition."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Index, Integer, MetaData, String, Table, Text, text

from contracts.columns import UtcDateTime
from sagas.state import TERMINAL

metadata = MetaData()

#: A saga not in a terminal state, as SQL: the predicate of the stuck sagas' partial index
#: (a query that says `status NOT IN` the terminal statuses, in any order, can use it).
UNFINISHED = "status NOT IN ({})".format(", ".join(f"'{status.value}'" for status in sorted(TERMINAL)))

_Id = BigInteger().with_variant(Integer(), "sqlite")

saga_instances = Table(
    "saga_instances",
    metadata,
    Column("saga_id", String(64), primary_key=True),
    Column("definition", String(64), nullable=False),
    Column("status", String(32), nullable=False),
    Column("step", Integer, nullable=False),
    Column("data", Text, nullable=False),
    Column("done_steps", Text, nullable=False),
    Column("pending_compensations", Text, nullable=False),
    Column("compensation_attempts", Integer, nullable=False),
    Column("reason", Text, nullable=True),
    Column("version", Integer, nullable=False),
    Column("started_at", UtcDateTime(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    # The saga's single active deadline (sagas.state.Deadline), all four NULL when it has
    # none: on the saga row, so a transition writes its state and deadline in one statement.
    Column("deadline_at", UtcDateTime(), nullable=True),
    Column("deadline_kind", String(16), nullable=True),
    Column("deadline_step", String(64), nullable=True),
    Column("deadline_attempt", Integer, nullable=True),
    Index("ix_saga_instances_status_updated", "status", "updated_at"),
    # The console's saga list: newest first across statuses, by keyset (updated_at, saga_id).
    Index("ix_saga_instances_updated", "updated_at", "saga_id"),
    # The console's search on an id's beginning (`LIKE 'prefix%'`): pattern ops on PostgreSQL,
    # whatever the database's collation.
    Index("ix_saga_instances_id_prefix", "saga_id", postgresql_ops={"saga_id": "varchar_pattern_ops"}),
    # The console's saga list by saga type, newest first by keyset (a rare type would
    # otherwise scan every saga).
    Index("ix_saga_instances_definition_updated", "definition", "updated_at", "saga_id"),
    # Stuck sagas (not terminal, not updated for a while): the console's stuck filter and
    # count read only the unfinished few, however many finished sagas there are.
    Index(
        "ix_saga_instances_unfinished_updated",
        "updated_at",
        "saga_id",
        postgresql_where=text(UNFINISHED),
        sqlite_where=text(UNFINISHED),
    ),
    # The sweep's index: only sagas with a deadline (finished ones have none).
    Index(
        "ix_saga_instances_deadline_due",
        "deadline_at",
        postgresql_where=text("deadline_at IS NOT NULL"),
        sqlite_where=text("deadline_at IS NOT NULL"),
    ),
)

saga_history = Table(
    "saga_history",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("saga_id", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("at", UtcDateTime(), nullable=False),
    Column("trigger", String(96), nullable=False),
    Column("message_id", String(36), nullable=True),
    Column("causation_id", String(36), nullable=True),
    Column("from_status", String(32), nullable=True),
    Column("to_status", String(32), nullable=False),
    Column("step", String(64), nullable=True),
    Column("note", Text, nullable=False),
    Column("sent", Text, nullable=False, doc="JSON list of {type, message_id} sent by this transition"),
    Index("ix_saga_history_saga", "saga_id", "version", unique=True),
)
