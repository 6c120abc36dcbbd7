"""`compensa outbox status`: pending outbox rows and relay lag."""

from __future__ import annotations

import typer
from rich.table import Table

from infra.cli.common import AppOpt, JsonOpt, command, console, load_app_or_exit, open_engine, print_json

app = typer.Typer(help="Transactional outbox.", no_args_is_help=True)


@app.command("status")
@command
async def outbox_status(as_json: JsonOpt = False, app: AppOpt = None) -> None:
    """Pending outbox rows and the oldest pending age (relay lag), per service; with --app, the app's outboxes."""
    from infra.apps import footprint
    from infra.clock import SystemClock
    from outbox.uow import pending_summary

    outboxes = footprint(load_app_or_exit(app, as_json=as_json)).outboxes
    engine = open_engine()
    try:
        rows = [await pending_summary(engine, name, SystemClock().now()) for name in outboxes]
    finally:
        await engine.dispose()
    if as_json:
        print_json(rows)
        return
    table = Table("service", "pending", "oldest pending (s)")
    for row in rows:
        table.add_row(row["service"], str(row["pending"]), f"{row['oldest_pending_age_seconds']:.1f}")
    console.print(table)
