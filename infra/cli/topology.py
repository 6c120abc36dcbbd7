"""`compensa topology declare`: the broker topology."""

from __future__ import annotations

import typer

from infra.cli.common import AppOpt, JsonOpt, command, console, load_app_or_exit, open_transport, print_json

app = typer.Typer(help="Broker topology.", no_args_is_help=True)


@app.command("declare")
@command
async def topology_declare(as_json: JsonOpt = False, app: AppOpt = None) -> None:
    """Declare exchanges, work queues, delay queues and dead-letter queues (idempotent); with --app, the app's."""
    from infra.apps import app_queues

    hosted = load_app_or_exit(app, as_json=as_json)
    queues = app_queues(hosted)
    transport = await open_transport(hosted)
    try:
        await transport.declare_topology()
    finally:
        await transport.close()
    if as_json:
        print_json(
            {
                "queues": [
                    {"name": q.name, "exchange": q.exchange.name, "routing_keys": list(q.routing_keys), "dlq": q.dlq}
                    for q in queues
                ]
            }
        )
        return
    for queue in queues:
        # Not markup: `[stock.reserve, …]` would be read as a style tag and vanish.
        console.print(
            f"{queue.name:<20} ← {queue.exchange.name} [{', '.join(queue.routing_keys)}]  dlq {queue.dlq}",
            highlight=False,
            markup=False,
        )
