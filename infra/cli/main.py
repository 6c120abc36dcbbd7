"""The root of the `compensa` command line: the one module that imports the groups.

Each group module (`db`, `saga`, `dlq`, …) defines its own `typer.Typer()` and imports
only `infra.cli.common`; the top-level commands (`simulate`, `run`, `relay`, `api`,
`health`) are plain functions in modules by topic, registered here. Nothing imports
this module but the console script (`compensa = "infra.cli.main:main"`) and `python -m infra.cli`.
"""

from __future__ import annotations

from typing import Annotated

import typer

from infra.cli import (
    api,
    audit,
    bench,
    broker,
    console,
    contracts,
    db,
    dlq,
    health,
    operators,
    order,
    outbox,
    producers,
    run,
    saga,
    simulate,
    stock,
    topology,
)

app = typer.Typer(
    name="compensa",
    help="Event-driven order saga on RabbitMQ with a transactional outbox.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"compensa {version('compensa')}")
        except PackageNotFoundError:
            typer.echo("compensa (not installed as a distribution)")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Event-driven order saga on RabbitMQ with a transactional outbox."""


app.add_typer(topology.app, name="topology")
app.add_typer(db.app, name="db")
app.add_typer(contracts.app, name="contracts")
app.add_typer(outbox.app, name="outbox")
app.add_typer(order.app, name="order")
app.add_typer(stock.app, name="stock")
app.add_typer(saga.app, name="saga")
app.add_typer(bench.app, name="bench")
app.add_typer(dlq.app, name="dlq")
app.add_typer(producers.app, name="producers")
app.add_typer(broker.app, name="broker")
app.add_typer(operators.app, name="operators")
app.add_typer(audit.app, name="audit")

app.command("simulate")(simulate.simulate)
app.command("run")(run.run)
app.command("relay")(run.relay)
app.command("api")(api.api)
app.command("health")(health.health)
app.command("console")(console.console)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
