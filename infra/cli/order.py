"""`compensa order place`: orders."""

from __future__ import annotations

from typing import Annotated

import typer

from infra.cli.common import JsonOpt, cell, command, console, open_engine, print_json

app = typer.Typer(help="Orders.", no_args_is_help=True)


@app.command("place")
@command
async def order_place(
    customer: Annotated[str, typer.Option(help="Customer id.")],
    line: Annotated[list[str], typer.Option("--line", help="SKU:QUANTITY:UNIT_PRICE_MINOR (repeatable).")],
    token: Annotated[str, typer.Option(help="Payment token (never a card number).")],
    currency: Annotated[str, typer.Option()] = "EUR",
    order_id: Annotated[str | None, typer.Option(help="Idempotent order id (default: generated).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Place an order: the order row and order.created commit in one transaction."""
    from consumers.orders import place_order
    from contracts import OrderLine
    from infra.clock import SystemClock

    lines = []
    for item in line:
        parts = item.split(":")
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            raise typer.BadParameter(f"expected SKU:QUANTITY:UNIT_PRICE_MINOR, got {item!r}", param_hint="--line")
        lines.append(OrderLine(sku=parts[0], quantity=int(parts[1]), unit_price=int(parts[2])))
    engine = open_engine()
    try:
        placed = await place_order(
            engine, SystemClock(), order_id=order_id, customer_id=customer, lines=lines, currency=currency, payment_token=token
        )
    finally:
        await engine.dispose()
    if as_json:
        print_json({"order_id": placed})
        return
    console.print(cell(f"order {placed} placed"))
