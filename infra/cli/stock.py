"""`compensa stock set|list`: stock levels."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from infra.cli.common import JsonOpt, cell, command, console, open_engine, print_json

app = typer.Typer(help="Stock levels.", no_args_is_help=True)


@app.command("set")
@command
async def stock_set(
    sku: Annotated[str, typer.Argument(help="The SKU.")],
    on_hand: Annotated[int, typer.Argument(min=0, help="Units free to reserve.")],
    as_json: JsonOpt = False,
) -> None:
    """Set a SKU's units on hand (creating it); reservations already held are kept."""
    from consumers.stock import seed_stock

    engine = open_engine()
    try:
        await seed_stock(engine, {sku: on_hand})
    finally:
        await engine.dispose()
    if as_json:
        print_json({"sku": sku, "on_hand": on_hand})
        return
    console.print(cell(f"{sku}: {on_hand} on hand"))


@app.command("list")
@command
async def stock_list(as_json: JsonOpt = False) -> None:
    """Units on hand and reserved per SKU."""
    from consumers.stock import stock_levels

    engine = open_engine()
    try:
        levels = await stock_levels(engine)
    finally:
        await engine.dispose()
    if as_json:
        print_json({sku: {"on_hand": on_hand, "reserved": reserved} for sku, (on_hand, reserved) in levels.items()})
        return
    table = Table("sku", "on hand", "reserved")
    for sku, (on_hand, reserved) in sorted(levels.items()):
        table.add_row(cell(sku), str(on_hand), str(reserved))
    console.print(table)
