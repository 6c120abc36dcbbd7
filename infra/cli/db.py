"""`compensa db upgrade`: the database schema."""

from __future__ import annotations

from typing import Annotated

import typer

from infra.cli.common import JsonOpt, cell, command, console, database, print_json

app = typer.Typer(help="Database schema.", no_args_is_help=True)


@app.command("upgrade")
@command
async def db_upgrade(
    revision: Annotated[str, typer.Option(help="Migrate to this revision.")] = "head",
    as_json: JsonOpt = False,
) -> None:
    """Create or migrate every service's tables (idempotent)."""
    from infra.schema import current_revision, upgrade

    async with database() as engine:
        await upgrade(engine, revision)
        reached = await current_revision(engine)
    if as_json:
        print_json({"revision": reached})
        return
    console.print(cell(f"database at revision {reached}"))
