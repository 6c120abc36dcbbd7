"""Small helpers every participant service shares: handler type, UTC reads, upserts."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table
from sqlalchemy.ext.asyncio import AsyncConnection

from contracts import Message
from outbox.uow import UnitOfWork, insert_for

Handler = Callable[[UnitOfWork, Message[Any]], Awaitable[None]]


def aware(moment: datetime) -> datetime:
    """Return the moment as aware UTC."""
    # SQLite hands back naive datetimes; everything compensa stores is UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def dialect_insert(connection: AsyncConnection, table: Table) -> Any:
    """Return an INSERT that supports ON CONFLICT on either backend."""
    return insert_for(connection.dialect.name, table)
