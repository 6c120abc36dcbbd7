"""Alembic environment: runs on the connection compensa hands it (SQLite or Postgres)."""

from __future__ import annotations

from alembic import context

from infra.schema import all_metadata, render_item

config = context.config


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("run migrations through `compensa db upgrade` (infra.schema.upgrade)")
    context.configure(
        connection=connection,
        target_metadata=all_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        render_item=render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError("offline migrations are not supported; point COMPENSA_DATABASE_URL at a database")
run_migrations_online()
