"""The producers allowed to publish over HTTP: one row per API key, the key hashed at rest."""

from __future__ import annotations

from sqlalchemy import Column, Index, Integer, String, Table, Text

from contracts.columns import UtcDateTime
from outbox.tables import metadata

ingest_producers = Table(
    "ingest_producers",
    metadata,
    Column("key_id", String(32), primary_key=True, comment="Public half of the API key, used to look it up."),
    Column("name", String(64), nullable=False, comment="Producer name, written into every envelope."),
    Column("key_salt", String(64), nullable=False),
    Column("key_hash", String(64), nullable=False, comment="hex HMAC-SHA256(salt, secret); the secret is never stored."),
    Column("allowed_types", Text, nullable=False, comment="JSON list of event types this key may publish."),
    Column("rate_limit", Integer, nullable=True, comment="Requests per window; NULL = the default."),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("revoked_at", UtcDateTime(), nullable=True),
    Index("ix_ingest_producers_name", "name"),
)
