"""The whole schema (every service's tables) and the migrations that build it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.types import TypeDecorator

# Importing the table modules registers every table on the shared metadata.
import consumers.ledger.tables
import consumers.orders.tables
import consumers.payments.tables
import consumers.stock.tables  # noqa: F401
import infra.audit
import infra.circuit_breakers
import infra.dlq.tables
import infra.operators  # noqa: F401
import producers.ingest.tables  # noqa: F401
from outbox.tables import metadata
from sagas.tables import metadata as saga_metadata

#: Every table compensa owns, across the two MetaData collections.
all_metadata = [metadata, saga_metadata]

MIGRATIONS = Path(__file__).parent / "migrations"


def render_item(kind: str, item: Any, autogen_context: Any) -> str | Literal[False]:
    """Autogenerate writes our column types (`UtcDateTime`) as the type they store as.

    A migration then reads `sa.DateTime(timezone=True)` and imports nothing of ours.
    """
    if kind == "type" and isinstance(item, TypeDecorator):
        return f"sa.{item.impl!r}"
    return False


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Apply migrations up to `revision` on the engine's database; safe to repeat."""

    def run(sync_connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = sync_connection
        command.upgrade(config, revision)

    async with engine.begin() as connection:
        await connection.run_sync(run)


async def current_revision(engine: AsyncEngine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    async with engine.connect() as connection:
        return await connection.run_sync(lambda sync: MigrationContext.configure(sync).get_current_revision())
