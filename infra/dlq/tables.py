"""The dead-letter archive table: one row per dead letter, queryable with plain SQL."""

from __future__ import annotations

from sqlalchemy import Column, Index, Integer, String, Table, Text, text

from contracts.columns import UtcDateTime
from outbox.tables import Id, metadata

#: Status of a dead letter: still to be dealt with, sent back to its queue, or set aside.
NEW, REPLAYED, PURGED = "new", "replayed", "purged"
STATUSES = (NEW, REPLAYED, PURGED)

#: `type` of a dead letter whose body is not a readable envelope.
UNDECODABLE = "<undecodable>"

#: `reason_class` of a dead letter the database refused as read, stored in a minimal
#: form instead (raw body in base64, headers as an ASCII repr) so it never blocks others.
QUARANTINED = "archive_quarantined"

#: What an `Integer` column holds on every backend (PostgreSQL's int4).
INTEGER_MIN, INTEGER_MAX = -(2**31), 2**31 - 1

dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column(
        "dedup_key",
        String(64),
        nullable=False,
        unique=True,
        doc="sha256 of the DLQ, message id, body and headers: a redelivered dead letter is stored once",
    ),
    Column("queue", String(255), nullable=False, doc="the work queue the message failed on"),
    Column("dlq", String(255), nullable=False, doc="the dead-letter queue it was archived from"),
    Column("message_id", String(255), nullable=True),
    Column("type", String(64), nullable=False),
    Column("version", Integer, nullable=True),
    Column("saga_id", String(64), nullable=True),
    Column("reason_class", String(64), nullable=False),
    Column("reason", Text, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("original_exchange", String(255), nullable=False),
    Column("original_routing_key", String(255), nullable=False),
    Column("first_failure_at", UtcDateTime(), nullable=False),
    Column("last_failure_at", UtcDateTime(), nullable=False),
    Column("body", Text, nullable=False),
    Column(
        "body_encoding",
        String(8),
        nullable=False,
        server_default="utf-8",
        doc="utf-8, or base64 when the body is not UTF-8 or holds NUL",
    ),
    Column(
        "headers", Text, nullable=False, doc="every AMQP header, as JSON (plus the originals of changed values, see archive.py)"
    ),
    Column("archived_at", UtcDateTime(), nullable=False),
    Column("status", String(16), nullable=False, server_default=NEW),
    Column("replayed_at", UtcDateTime(), nullable=True),
    Column("replay_count", Integer, nullable=False, server_default=text("0")),
    Column("replay_patch", Text, nullable=True, doc="the JSON merge patch applied by the last replay"),
    Column("purged_at", UtcDateTime(), nullable=True),
    Index("ix_dead_letters_status_failure", "status", "last_failure_at"),
    Index("ix_dead_letters_queue_reason", "queue", "reason_class"),
    # The console's members of a failure group, newest failure first, by keyset.
    Index("ix_dead_letters_group", "queue", "reason_class", "type", "last_failure_at", "id"),
    Index("ix_dead_letters_saga", "saga_id"),
    Index("ix_dead_letters_message", "message_id"),
)
