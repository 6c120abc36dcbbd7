"""`compensa audit list`: the audit trail of operator actions (console and CLI)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from infra.cli.common import JsonOpt, cell, command, console, database, fail, one_line_table, print_json, when

app = typer.Typer(help="The audit trail: who did what, when, to what, with which outcome.", no_args_is_help=True)


@app.command("list")
@command
async def audit_list(
    actor: Annotated[str | None, typer.Option("--who", help="Only actions by this operator or OS user.")] = None,
    action: Annotated[str | None, typer.Option("--action", help="Only this action (dlq.replay, saga.cancel, …).")] = None,
    saga: Annotated[str | None, typer.Option("--saga", help="Only actions on this saga.")] = None,
    outcome: Annotated[str | None, typer.Option("--outcome", help="ok, refused or denied.")] = None,
    before: Annotated[int | None, typer.Option("--before", min=1, help="Older than this audit id (the next page).")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="Rows, newest first.")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """List recorded operator actions, newest first."""
    from infra.audit import OUTCOMES, AuditFilter, list_audit

    if outcome is not None and outcome not in OUTCOMES:
        fail(f"--outcome: choose from {', '.join(OUTCOMES)}")
    for option, value in (("--who", actor), ("--action", action), ("--saga", saga)):
        if value is not None and len(value) > 128:
            fail(f"{option}: at most 128 characters")
    async with database() as engine, engine.connect() as connection:
        rows = await list_audit(
            connection, AuditFilter(actor=actor, action=action, saga_id=saga, outcome=outcome), before_id=before, limit=limit
        )
    if as_json:
        print_json(rows)
        return
    console.print(
        one_line_table(
            ["id", "when (UTC)", "who", "via", "action", "outcome", "targets", "parameters", "detail"],
            [
                [
                    r["id"],
                    when(r["at"]),
                    r["actor"],
                    r["via"],
                    r["action"],
                    r["outcome"],
                    json.dumps(r["targets"]) if not isinstance(r["targets"], str) else r["targets"],
                    json.dumps(r["parameters"]) if not isinstance(r["parameters"], str) else r["parameters"],
                    r["detail"],
                ]
                for r in rows
            ],
            width=console.width,
            keep=("id",),
            hide=("parameters", "via", "targets", "when (UTC)"),
        )
    )
    if not rows:
        console.print("no actions recorded", highlight=False)
    elif len(rows) == limit:
        console.print(cell(f"older ones: compensa audit list --before {rows[-1]['id']}"))
