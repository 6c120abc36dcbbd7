"""`compensa operators add|list|revoke`: accounts of the operator console, tokens stored hashed."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from infra.cli.common import JsonOpt, audited, cell, clip, command, console, database, err, fail, one_line_table, print_json, when

app = typer.Typer(help="Operator console accounts: tokens (stored hashed) with a role, viewer or operator.", no_args_is_help=True)


@app.command("add")
@command
async def operators_add(
    name: Annotated[str, typer.Argument(help="Who the audit trail names (1-64 letters, digits, '.', '_', '@', '-').")],
    role: Annotated[str, typer.Option("--role", help="viewer (read) or operator (read and act).")] = "viewer",
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print the operator, role, token id and the token itself as one JSON document on stdout "
            '(a failure is {"ok": false, "error": "…"}).',
        ),
    ] = False,
) -> None:
    """Make a console token for an operator; the token is printed once and stored only hashed."""
    from infra.clock import SystemClock
    from infra.operators import OperatorStore, generate_token

    try:
        token, record = generate_token(name, role, SystemClock().now())
    except ValueError as exc:
        fail(str(exc))
    async with database() as engine:
        await OperatorStore(engine).add(record)
        await audited(engine, "operators.add", [record.name], detail=f"token {record.key_id}", parameters={"role": record.role})
    if as_json:
        print_json({"name": record.name, "role": record.role, "key_id": record.key_id, "token": token})
        return
    err.print(cell(f"operator {record.name!r} ({record.role}) token {record.key_id}; stored hashed in the database."))
    err.print("The token below is shown once: hand it to the operator now.", highlight=False, markup=False)
    sys.stdout.write(token + "\n")


@app.command("list")
@command
async def operators_list(as_json: JsonOpt = False) -> None:
    """List console tokens (never the secrets): operator, token id, role, state."""
    from infra.operators import OperatorStore

    async with database() as engine:
        records = await OperatorStore(engine).list_all()
    rows: list[dict[str, Any]] = [
        {
            "name": r.name,
            "key_id": r.key_id,
            "role": r.role,
            "created_at": r.created_at,
            "last_signin_at": r.last_signin_at,
            "revoked_at": r.revoked_at,
        }
        for r in records
    ]
    if as_json:
        print_json(rows)
        return
    console.print(
        one_line_table(
            ["operator", "token id", "role", "created (UTC)", "last sign-in", "state"],
            [
                [
                    r["name"],
                    r["key_id"],
                    r["role"],
                    when(r["created_at"]),
                    when(r["last_signin_at"]),
                    f"revoked {when(r['revoked_at'])}" if r["revoked_at"] else "active",
                ]
                for r in rows
            ],
            width=console.width,
            keep=("operator", "token id"),
            hide=("created (UTC)", "last sign-in"),
        )
    )
    if not rows:
        console.print("no operators yet: `compensa operators add NAME --role operator`", highlight=False)


@app.command("revoke")
@command
async def operators_revoke(
    name_or_key_id: Annotated[str, typer.Argument(help="A token id (one token) or an operator name (all their tokens).")],
    as_json: JsonOpt = False,
) -> None:
    """Revoke console tokens: their sessions end at the next request."""
    from infra.clock import SystemClock
    from infra.operators import OperatorStore

    async with database() as engine:
        revoked = await OperatorStore(engine).revoke(name_or_key_id, SystemClock().now())
        await audited(
            engine,
            "operators.revoke",
            [name_or_key_id],
            outcome="ok" if revoked else "refused",
            detail=f"revoked token(s) {', '.join(revoked)}" if revoked else "no active token with this id or operator name",
        )
    if not revoked:
        fail(f"no active token with id or operator name {clip(name_or_key_id)} (`compensa operators list`)")
    if as_json:
        print_json({"revoked": revoked, "target": name_or_key_id})
        return
    console.print(cell(f"revoked {len(revoked)} token(s) of {name_or_key_id!r}"))
