"""Small helpers every participant service shares: upserts."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Table
from sqlalchemy.ext.asyncio import AsyncConnection

from outbox.uow import insert_for


def dialect_insert(connection: AsyncConnection, table: Table) -> Any:
    """Return an INSERT that supports ON CONFLICT on either backend."""
    return insert_for(connection.dialect.name, table)
