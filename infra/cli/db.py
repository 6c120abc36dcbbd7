"""`compensa db upgrade`: the database schema."""

from __future__ import annotations

import typer

from infra.cli.common import cell, command, console, open_engine

app = typer.Typer(help="Database schema.", no_args_is_help=True)


@app.command("upgrade")
@command
async def db_upgrade(revision: str = "head") -> None:
    """Create or migrate every service's tables (idempotent)."""
    from infra.schema import current_revision, upgrade

    engine = open_engine()
    try:
        await upgrade(engine, revision)
        console.print(cell(f"database at revision {await current_revision(engine)}"))
    finally:
        await engine.dispose()
