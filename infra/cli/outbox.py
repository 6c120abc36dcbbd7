"""`compensa outbox status`: pending outbox rows and relay lag."""

from __future__ import annotations

import typer
from rich.table import Table

from infra.cli.common import JsonOpt, command, console, open_engine, print_json

app = typer.Typer(help="Transactional outbox.", no_args_is_help=True)


@app.command("status")
@command
async def outbox_status(as_json: JsonOpt = False) -> None:
    """Pending outbox rows and the oldest pending age (relay lag), per service."""
    from infra.bootstrap import OUTBOX_SERVICES
    from infra.clock import SystemClock
    from outbox.uow import pending_summary

    engine = open_engine()
    try:
        rows = [await pending_summary(engine, name, SystemClock().now()) for name in OUTBOX_SERVICES]
    finally:
        await engine.dispose()
    if as_json:
        print_json(rows)
        return
    table = Table("service", "pending", "oldest pending (s)")
    for row in rows:
        table.add_row(row["service"], str(row["pending"]), f"{row['oldest_pending_age_seconds']:.1f}")
    console.print(table)
