"""API keys: generated once, shown once, stored as a salted HMAC; looked up by their public id.

A key reads ``cpk_<key id>_<secret>``. The key id (16 hex digits) finds the record;
the secret (256 random bits) is checked against ``HMAC-SHA256(salt, secret)`` in
constant time. Neither the secret nor the whole key is ever stored or logged.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts import REGISTRY, ContractError
from producers.ingest.tables import ingest_producers

KEY_PREFIX = "cpk"


@dataclass(frozen=True)
class Producer:
    """An authenticated caller: whose events these are and what it may publish."""

    name: str
    key_id: str
    allowed_types: frozenset[str]
    rate_limit: int | None = None

    def may_publish(self, type_: str) -> bool:
        return type_ in self.allowed_types


@dataclass(frozen=True)
class ApiKey:
    """A key as stored: everything but the secret."""

    key_id: str
    name: str
    key_salt: str
    key_hash: str
    allowed_types: tuple[str, ...]
    rate_limit: int | None = None
    created_at: datetime | None = None
    revoked_at: datetime | None = None

    def verify(self, secret: str) -> bool:
        return hmac.compare_digest(self.key_hash, _digest(self.key_salt, secret))

    def producer(self) -> Producer:
        return Producer(self.name, self.key_id, frozenset(self.allowed_types), self.rate_limit)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "key_id": self.key_id,
            "key_salt": self.key_salt,
            "key_hash": self.key_hash,
            "types": list(self.allowed_types),
            "rate_limit": self.rate_limit,
        }


def _digest(salt_hex: str, secret: str) -> str:
    return hmac.new(bytes.fromhex(salt_hex), secret.encode(), hashlib.sha256).hexdigest()


def split_key(presented: str) -> tuple[str, str] | None:
    """Return (key id, secret) of a well-formed key, else None."""
    parts = presented.strip().split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


def check_types(types: Iterable[str]) -> tuple[str, ...]:
    """Return the event types sorted and deduplicated; raise ContractError for unknown or command types."""
    kinds = {model.message_type: model.kind for model in REGISTRY}
    chosen = sorted({t.strip() for t in types if t.strip()})
    if not chosen:
        raise ContractError("give at least one event type")
    unknown = [t for t in chosen if t not in kinds]
    if unknown:
        raise ContractError(f"unknown event type(s) {', '.join(unknown)}; known events: {', '.join(event_types())}")
    commands = [t for t in chosen if kinds[t] != "event"]
    if commands:
        raise ContractError(f"{', '.join(commands)} are commands; producers may only publish events")
    return tuple(chosen)


def event_types() -> list[str]:
    return sorted({model.message_type for model in REGISTRY if model.kind == "event"})


def generate_key(
    name: str, types: Iterable[str], *, rate_limit: int | None = None, now: datetime | None = None
) -> tuple[str, ApiKey]:
    """Make a new key for `name`: return the key to hand out (once) and the record to store."""
    if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ContractError("producer name must be 1-64 letters, digits, '-', '_' or '.'")
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_hex(16)
    record = ApiKey(
        key_id=key_id,
        name=name,
        key_salt=salt,
        key_hash=_digest(salt, secret),
        allowed_types=check_types(types),
        rate_limit=rate_limit,
        created_at=now,
    )
    return f"{KEY_PREFIX}_{key_id}_{secret}", record


def load_keys_file(path: Path) -> list[ApiKey]:
    """Read keys configured in a JSON file: ``{"producers": [{name, key_id, key_salt, key_hash, types}]}``."""
    document = json.loads(path.read_text())
    entries = document.get("producers", []) if isinstance(document, dict) else document
    keys = []
    for entry in entries:
        keys.append(
            ApiKey(
                key_id=entry["key_id"],
                name=entry["name"],
                key_salt=entry["key_salt"],
                key_hash=entry["key_hash"],
                allowed_types=check_types(entry["types"]),
                rate_limit=entry.get("rate_limit"),
            )
        )
    return keys


def append_to_keys_file(path: Path, record: ApiKey) -> None:
    document: dict[str, Any] = {"producers": []}
    if path.exists():
        document = json.loads(path.read_text())
    document.setdefault("producers", []).append(record.to_json())
    path.write_text(json.dumps(document, indent=2) + "\n")


class ProducerStore:
    """API key records in the `ingest_producers` table."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def add(self, record: ApiKey) -> None:
        async with self.engine.begin() as connection:
            await connection.execute(
                insert(ingest_producers).values(
                    key_id=record.key_id,
                    name=record.name,
                    key_salt=record.key_salt,
                    key_hash=record.key_hash,
                    allowed_types=json.dumps(list(record.allowed_types)),
                    rate_limit=record.rate_limit,
                    created_at=record.created_at,
                )
            )

    async def get(self, key_id: str) -> ApiKey | None:
        async with self.engine.connect() as connection:
            row = (await connection.execute(select(ingest_producers).where(ingest_producers.c.key_id == key_id))).one_or_none()
        return _record(row) if row is not None else None

    async def list(self, include_revoked: bool = True) -> list[ApiKey]:
        query = select(ingest_producers).order_by(ingest_producers.c.name, ingest_producers.c.created_at)
        if not include_revoked:
            query = query.where(ingest_producers.c.revoked_at.is_(None))
        async with self.engine.connect() as connection:
            return [_record(row) for row in (await connection.execute(query)).all()]

    async def revoke(self, name_or_key_id: str, now: datetime) -> int:
        """Revoke one key (by key id) or every key of a producer (by name); return how many."""
        p = ingest_producers.c
        async with self.engine.begin() as connection:
            result = await connection.execute(
                update(ingest_producers)
                .where((p.key_id == name_or_key_id) | (p.name == name_or_key_id), p.revoked_at.is_(None))
                .values(revoked_at=now)
            )
        return result.rowcount


def _record(row: Any) -> ApiKey:
    return ApiKey(
        key_id=row.key_id,
        name=row.name,
        key_salt=row.key_salt,
        key_hash=row.key_hash,
        allowed_types=tuple(json.loads(row.allowed_types)),
        rate_limit=row.rate_limit,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


@dataclass
class ProducerDirectory:
    """Authenticate presented keys against the keys file and the table, with a short cache."""

    store: ProducerStore | None = None
    configured: Sequence[ApiKey] = ()
    cache_seconds: float = 5.0
    monotonic: Callable[[], float] = time.monotonic
    _cache: dict[str, tuple[float, ApiKey | None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._configured = {record.key_id: record for record in self.configured}

    async def authenticate(self, presented: str | None) -> Producer | None:
        """Return the producer the key belongs to, or None (missing, malformed, unknown, revoked)."""
        if not presented:
            return None
        parts = split_key(presented)
        if parts is None:
            return None
        key_id, secret = parts
        record = await self._lookup(key_id)
        if record is None or record.revoked_at is not None or not record.verify(secret):
            return None
        return record.producer()

    async def _lookup(self, key_id: str) -> ApiKey | None:
        if key_id in self._configured:
            return self._configured[key_id]
        if self.store is None:
            return None
        now = self.monotonic()
        cached = self._cache.get(key_id)
        if cached is not None and now - cached[0] < self.cache_seconds:
            return cached[1]
        record = await self.store.get(key_id)
        if self.cache_seconds > 0:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[key_id] = (now, record)
        return record
