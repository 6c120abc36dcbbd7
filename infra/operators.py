"""Operator accounts of the console: a name, a role and tokens stored hashed.

The scheme is the API keys' (`producers/ingest/auth.py`): a token reads
``cop_<key id>_<secret>``; the key id (16 hex digits) finds the row, the secret (256
random bits) is checked against ``HMAC-SHA256(salt, secret)`` in constant time. The
token is printed once by `compensa operators add` and stored nowhere. Two roles:
`viewer` reads, `operator` reads and acts.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Column, Index, String, Table, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts.columns import UtcDateTime
from outbox.tables import metadata

TOKEN_PREFIX = "cop"
VIEWER, OPERATOR = "viewer", "operator"
ROLES = (VIEWER, OPERATOR)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")

operators = Table(
    "operators",
    metadata,
    Column("key_id", String(16), primary_key=True, doc="public half of a token: cop_<key_id>_<secret>"),
    Column("name", String(64), nullable=False, doc="who the audit trail names"),
    Column("role", String(16), nullable=False, doc="viewer (read) or operator (read and act)"),
    Column("key_salt", String(32), nullable=False),
    Column("key_hash", String(64), nullable=False, doc="HMAC-SHA256(salt, secret), hex"),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("revoked_at", UtcDateTime(), nullable=True),
    Column("last_signin_at", UtcDateTime(), nullable=True),
    Index("ix_operators_name", "name"),
)


@dataclass(frozen=True)
class Operator:
    """An account's token as stored: everything but the secret."""

    key_id: str
    name: str
    role: str
    key_salt: str
    key_hash: str
    created_at: datetime
    revoked_at: datetime | None = None
    last_signin_at: datetime | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    @property
    def may_act(self) -> bool:
        return self.role == OPERATOR

    def verify(self, secret: str) -> bool:
        return hmac.compare_digest(self.key_hash, _digest(self.key_salt, secret))


def _digest(salt_hex: str, secret: str) -> str:
    return hmac.new(bytes.fromhex(salt_hex), secret.encode(), hashlib.sha256).hexdigest()


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError("an operator name is 1-64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit")
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; choose from {', '.join(ROLES)}")
    return role


def split_token(presented: str) -> tuple[str, str] | None:
    """(key id, secret) of a well-formed token, else None."""
    parts = presented.strip().split("_", 2)
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX or not re.fullmatch(r"[0-9a-f]{16}", parts[1]) or not parts[2]:
        return None
    if len(parts[2]) > 128:
        return None
    return parts[1], parts[2]


def generate_token(name: str, role: str, now: datetime) -> tuple[str, Operator]:
    """A new token for `name` with `role`: the token to hand out (once) and the row to store."""
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_hex(16)
    record = Operator(
        key_id=key_id,
        name=check_name(name),
        role=check_role(role),
        key_salt=salt,
        key_hash=_digest(salt, secret),
        created_at=now,
    )
    return f"{TOKEN_PREFIX}_{key_id}_{secret}", record


class OperatorStore:
    """Operator tokens in the `operators` table."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def add(self, record: Operator) -> None:
        async with self.engine.begin() as connection:
            await connection.execute(
                insert(operators).values(
                    key_id=record.key_id,
                    name=record.name,
                    role=record.role,
                    key_salt=record.key_salt,
                    key_hash=record.key_hash,
                    created_at=record.created_at,
                )
            )

    async def get(self, key_id: str) -> Operator | None:
        async with self.engine.connect() as connection:
            row = (await connection.execute(select(operators).where(operators.c.key_id == key_id))).one_or_none()
        return Operator(**row._mapping) if row is not None else None

    async def list_all(self) -> list[Operator]:
        query = select(operators).order_by(operators.c.name, operators.c.created_at)
        async with self.engine.connect() as connection:
            return [Operator(**row._mapping) for row in (await connection.execute(query)).all()]

    async def revoke(self, name_or_key_id: str, now: datetime) -> list[str]:
        """Revoke one token (by key id) or every token of an operator (by name); return the key ids."""
        o = operators.c
        async with self.engine.begin() as connection:
            result = await connection.execute(
                update(operators)
                .where((o.key_id == name_or_key_id) | (o.name == name_or_key_id), o.revoked_at.is_(None))
                .values(revoked_at=now)
                .returning(o.key_id)
            )
            return list(result.scalars())

    async def authenticate(self, presented: str, now: datetime) -> Operator | None:
        """The active operator a token belongs to (and note the sign-in), or None."""
        parts = split_token(presented)
        if parts is None:
            return None
        record = await self.get(parts[0])
        if record is None or not record.active or not record.verify(parts[1]):
            return None
        async with self.engine.begin() as connection:
            await connection.execute(update(operators).where(operators.c.key_id == record.key_id).values(last_signin_at=now))
        return record
