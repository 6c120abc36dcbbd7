"""The migration history, on SQLite and on PostgreSQL.

Up to head, down to base and up again leaves the same schema; at head the database
holds exactly what the SQLAlchemy tables describe (Alembic's autogenerate comparison
finds nothing to add, drop or alter). Migrations that move data carry it both ways.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata, produce_migrations, render_python_code
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Integer, String, column, insert, inspect, select, table, text
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts.columns import UtcDateTime
from infra.db import create_engine, scratch_database
from infra.schema import alembic_config, all_metadata, current_revision, render_item, upgrade
from sagas.tables import saga_instances

pytestmark = pytest.mark.integration

HEAD = ScriptDirectory.from_config(alembic_config()).get_current_head()
TABLES = sorted(table.name for metadata in all_metadata for table in metadata.tables.values())


@pytest.fixture(params=["sqlite", "postgresql"])
async def empty_engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """A database with nothing in it: a new SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'compensa.db'}")
        try:
            yield engine
        finally:
            await engine.dispose()
        return
    async with scratch_database(request.getfixturevalue("database_url"), "it_migrations") as url:
        engine = create_engine(url)
        try:
            yield engine
        finally:
            await engine.dispose()


async def downgrade(engine: AsyncEngine, revision: str) -> None:
    """Revert migrations down to `revision`, as `infra.schema.upgrade` applies them."""

    def run(sync_connection: Any) -> None:
        config: Config = alembic_config()
        config.attributes["connection"] = sync_connection
        command.downgrade(config, revision)

    async with engine.begin() as connection:
        await connection.run_sync(run)


async def inspected(engine: AsyncEngine, look: Callable[[Any], Any]) -> Any:
    async with engine.connect() as connection:
        return await connection.run_sync(lambda sync: look(inspect(sync)))


async def schema(engine: AsyncEngine) -> dict[str, Any]:
    """Every table's columns, indexes, unique constraints and checks, as comparable text."""

    def read(inspector: Any) -> dict[str, Any]:
        return {
            name: (
                [(c["name"], str(c["type"]), c["nullable"], c.get("default")) for c in inspector.get_columns(name)],
                sorted((i["name"], tuple(i["column_names"]), bool(i["unique"])) for i in inspector.get_indexes(name)),
                sorted(tuple(u["column_names"]) for u in inspector.get_unique_constraints(name)),
                sorted(str(c["sqltext"]) for c in inspector.get_check_constraints(name)),
            )
            for name in inspector.get_table_names()
        }

    return await inspected(engine, read)


async def schema_drift(engine: AsyncEngine) -> list[Any]:
    """What autogenerate would write to bring the database to the tables: [] when none."""

    def compare(sync_connection: Any) -> list[Any]:
        context = MigrationContext.configure(sync_connection, opts={"compare_type": True})
        return list(compare_metadata(context, all_metadata))

    async with engine.connect() as connection:
        return await connection.run_sync(compare)


async def notify_triggers(engine: AsyncEngine) -> list[str]:
    """The outbox NOTIFY triggers (PostgreSQL only; SQLite has none)."""
    if engine.dialect.name != "postgresql":
        return []
    async with engine.connect() as connection:
        rows = await connection.execute(text("SELECT tgname FROM pg_trigger WHERE tgname LIKE '%_outbox_notify' ORDER BY tgname"))
        return list(rows.scalars())


async def test_upgrade_downgrade_to_base_and_upgrade_again(empty_engine: AsyncEngine) -> None:
    engine = empty_engine

    await upgrade(engine)
    assert await current_revision(engine) == HEAD
    assert sorted(set(await inspected(engine, lambda i: i.get_table_names())) - {"alembic_version"}) == TABLES
    at_head = await schema(engine)
    triggers = await notify_triggers(engine)
    if engine.dialect.name == "postgresql":
        assert len(triggers) == 7

    await downgrade(engine, "base")
    assert await current_revision(engine) is None
    assert await inspected(engine, lambda i: i.get_table_names()) == ["alembic_version"]
    assert await notify_triggers(engine) == []

    await upgrade(engine)
    assert await current_revision(engine) == HEAD
    assert sorted(set(await inspected(engine, lambda i: i.get_table_names())) - {"alembic_version"}) == TABLES
    assert await schema(engine) == at_head
    assert await notify_triggers(engine) == triggers


async def test_each_migration_steps_down_and_up_again(empty_engine: AsyncEngine) -> None:
    revisions = [script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()]
    for revision in reversed(revisions):  # oldest first
        await upgrade(empty_engine, revision)
        await downgrade(empty_engine, "-1")
        await upgrade(empty_engine, revision)
        assert await current_revision(empty_engine) == revision


async def test_the_schema_at_head_is_what_the_tables_describe(empty_engine: AsyncEngine) -> None:
    await upgrade(empty_engine)
    assert await schema_drift(empty_engine) == []

    await downgrade(empty_engine, "base")
    await upgrade(empty_engine)
    assert await schema_drift(empty_engine) == []


async def test_autogenerate_writes_utc_columns_as_plain_timestamps(empty_engine: AsyncEngine) -> None:
    """A future migration reads `sa.DateTime(timezone=True)`, as 0001 does, never our type."""

    def render(sync_connection: Any) -> str:
        context = MigrationContext.configure(sync_connection, opts={"compare_type": True})
        return render_python_code(produce_migrations(context, all_metadata).upgrade_ops, render_item=render_item)

    async with empty_engine.connect() as connection:
        code = await connection.run_sync(render)
    utc_columns = [
        column
        for metadata in all_metadata
        for table in metadata.tables.values()
        for column in table.columns
        if isinstance(column.type, UtcDateTime)
    ]
    assert "UtcDateTime" not in code
    assert code.count("sa.DateTime(timezone=True)") == len(utc_columns) > 0


#: `saga_deadlines` as 0001 made it (0005 moves its rows onto `saga_instances`).
saga_deadlines_0004 = table(
    "saga_deadlines",
    column("saga_id", String()),
    column("due_at", UtcDateTime()),
    column("kind", String()),
    column("step", String()),
    column("attempt", Integer()),
)


async def test_0005_moves_each_saga_deadline_onto_its_saga_row_and_back(empty_engine: AsyncEngine) -> None:
    engine = empty_engine
    due = datetime(2026, 5, 1, 12, 0, 30, 250000, tzinfo=UTC)
    await upgrade(engine, "0004")
    async with engine.begin() as connection:
        for saga_id in ("waiting", "finished"):
            await connection.execute(
                insert(saga_instances).values(
                    saga_id=saga_id,
                    definition="order",
                    status="compensating" if saga_id == "waiting" else "completed",
                    step=1,
                    data="{}",
                    done_steps="[]",
                    pending_compensations="[]",
                    compensation_attempts=2,
                    reason=None,
                    version=4,
                    started_at=due,
                    updated_at=due,
                )
            )
        await connection.execute(
            insert(saga_deadlines_0004).values(saga_id="waiting", due_at=due, kind="compensation", step="charge", attempt=2)
        )

    await upgrade(engine, "0005")
    assert "saga_deadlines" not in await inspected(engine, lambda i: i.get_table_names())
    async with engine.connect() as connection:
        rows = (await connection.execute(select(saga_instances).order_by(saga_instances.c.saga_id))).all()
    assert [(r.saga_id, r.deadline_at, r.deadline_kind, r.deadline_step, r.deadline_attempt) for r in rows] == [
        ("finished", None, None, None, None),
        ("waiting", due, "compensation", "charge", 2),
    ]
    assert [(r.saga_id, r.status, r.version) for r in rows] == [("finished", "completed", 4), ("waiting", "compensating", 4)]

    await downgrade(engine, "0004")
    columns = [c["name"] for c in await inspected(engine, lambda i: i.get_columns("saga_instances"))]
    assert not [name for name in columns if name.startswith("deadline_")]
    async with engine.connect() as connection:
        back = (await connection.execute(select(saga_deadlines_0004))).all()
    assert [tuple(row) for row in back] == [("waiting", due, "compensation", "charge", 2)]
