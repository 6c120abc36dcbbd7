"""`compensa topology declare`: the broker topology."""

from __future__ import annotations

import typer

from infra.cli.common import command, console, open_transport

app = typer.Typer(help="Broker topology.", no_args_is_help=True)


@app.command("declare")
@command
async def topology_declare() -> None:
    """Declare exchanges, work queues, delay queues and dead-letter queues (idempotent)."""
    from infra import topology as t

    transport = await open_transport()
    try:
        await transport.declare_topology()
    finally:
        await transport.close()
    for queue in t.WORK_QUEUES:
        # Not markup: `[stock.reserve, …]` would be read as a style tag and vanish.
        console.print(
            f"{queue.name:<20} ← {queue.exchange.name} [{', '.join(queue.routing_keys)}]  dlq {queue.dlq}",
            highlight=False,
            markup=False,
        )
