"""`compensa db upgrade`: the database schema."""

from __future__ import annotations

from typing import Annotated

import typer

from infra.cli.common import AppOpt, JsonOpt, cell, command, console, database, load_app_or_exit, print_json

app = typer.Typer(help="Database schema.", no_args_is_help=True)


@app.command("upgrade")
@command
async def db_upgrade(
    revision: Annotated[str, typer.Option(help="Migrate to this revision.")] = "head",
    as_json: JsonOpt = False,
    app: AppOpt = None,
) -> None:
    """Create or migrate every service's tables (idempotent); with --app, create the app's tables too."""
    from infra.apps import create_app_tables
    from infra.schema import current_revision, upgrade

    hosted = load_app_or_exit(app, as_json=as_json)
    async with database() as engine:
        await upgrade(engine, revision)
        reached = await current_revision(engine)
        created = await create_app_tables(engine, hosted) if app is not None else []
    if as_json:
        print_json({"revision": reached} | ({"app": hosted.name, "app_tables": created} if app is not None else {}))
        return
    console.print(cell(f"database at revision {reached}"))
    if app is not None:
        console.print(cell(f"app {hosted.name}: tables {', '.join(created)} present"))
