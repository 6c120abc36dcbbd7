"""`compensa topology declare`: the broker topology."""

from __future__ import annotations

import typer

from infra.cli.common import JsonOpt, command, console, open_transport, print_json

app = typer.Typer(help="Broker topology.", no_args_is_help=True)


@app.command("declare")
@command
async def topology_declare(as_json: JsonOpt = False) -> None:
    """Declare exchanges, work queues, delay queues and dead-letter queues (idempotent)."""
    from infra import topology as t

    transport = await open_transport()
    try:
        await transport.declare_topology()
    finally:
        await transport.close()
    if as_json:
        print_json(
            {
                "queues": [
                    {"name": q.name, "exchange": q.exchange.name, "routing_keys": list(q.routing_keys), "dlq": q.dlq}
                    for q in t.WORK_QUEUES
                ]
            }
        )
        return
    for queue in t.WORK_QUEUES:
        # Not markup: `[stock.reserve, …]` would be read as a style tag and vanish.
        console.print(
            f"{queue.name:<20} ← {queue.exchange.name} [{', '.join(queue.routing_keys)}]  dlq {queue.dlq}",
            highlight=False,
            markup=False,
        )
