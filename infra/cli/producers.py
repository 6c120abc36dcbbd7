"""`compensa producers add|list|revoke`: API keys of upstream producers (HTTP ingest)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from infra.cli.common import (
    JsonOpt,
    audited,
    cell,
    clip,
    command,
    console,
    err,
    fail,
    one_line_table,
    open_engine,
    print_json,
    when,
)
from infra.settings import get_settings

app = typer.Typer(help="API keys of upstream producers (HTTP ingest).", no_args_is_help=True)


def _split_types(types: str) -> list[str]:
    return [t for t in (part.strip() for part in types.split(",")) if t]


@app.command("add")
@command
async def producers_add(
    name: Annotated[str, typer.Argument(help="Producer name, written into every envelope it publishes.")],
    types: Annotated[str, typer.Option("--types", help="Comma-separated event types it may publish.")],
    rate_limit: Annotated[int | None, typer.Option(min=1, help="Requests per window (default COMPENSA_API_RATE_LIMIT).")] = None,
    file: Annotated[
        Path | None, typer.Option("--file", help="Append the hashed key to this JSON keys file instead of the database.")
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print the producer, key id, types and the key itself as one JSON document on stdout "
            '(a failure is {"ok": false, "error": "…"}).',
        ),
    ] = False,
) -> None:
    """Create an API key for a producer; the key is printed once and never stored."""
    from infra.clock import SystemClock
    from producers.ingest import ProducerStore, generate_key
    from producers.ingest.auth import append_to_keys_file

    key, record = generate_key(name, _split_types(types), rate_limit=rate_limit, now=SystemClock().now())
    if file is not None:
        append_to_keys_file(file, record)
        where = f"{file} (set COMPENSA_API_KEYS_FILE={file})"
    else:
        engine = open_engine()
        try:
            await ProducerStore(engine).add(record)
            await audited(
                engine,
                "producers.add",
                [record.name],
                detail=f"key {record.key_id}",
                parameters={"types": list(record.allowed_types), "rate_limit": record.rate_limit},
            )
        finally:
            await engine.dispose()
        where = "the database"
    if as_json:
        print_json(
            {
                "name": record.name,
                "key_id": record.key_id,
                "types": list(record.allowed_types),
                "rate_limit": record.rate_limit,
                "stored_in": str(file) if file is not None else "database",
                "key": key,
            }
        )
        return
    err.print(
        cell(
            f"producer {record.name!r} key {record.key_id} may publish {', '.join(record.allowed_types)}; "
            f"stored hashed in {where}."
        )
    )
    err.print("The key below is shown once: store it in the producer's secret store now.", highlight=False, markup=False)
    sys.stdout.write(key + "\n")


@app.command("list")
@command
async def producers_list(as_json: JsonOpt = False) -> None:
    """List API keys (never the secrets): producer, key id, allowed types, state."""
    from producers.ingest import ProducerStore
    from producers.ingest.auth import load_keys_file

    settings = get_settings()
    engine = open_engine()
    try:
        records = [("database", r) for r in await ProducerStore(engine).list()]
    finally:
        await engine.dispose()
    if settings.api_keys_file and settings.api_keys_file.exists():
        records += [(str(settings.api_keys_file), r) for r in load_keys_file(settings.api_keys_file)]
    rows: list[dict[str, Any]] = [
        {
            "name": r.name,
            "key_id": r.key_id,
            "types": list(r.allowed_types),
            "rate_limit": r.rate_limit,
            "created_at": r.created_at,
            "revoked_at": r.revoked_at,
            "source": source,
        }
        for source, r in records
    ]
    if as_json:
        print_json(rows)
        return
    # Key ids are never cut (`producers revoke` needs them whole); the other columns shrink or hide.
    console.print(
        one_line_table(
            ["producer", "key id", "types", "rate limit", "created (UTC)", "state", "source"],
            [
                [
                    row["name"],
                    row["key_id"],
                    ", ".join(row["types"]),
                    row["rate_limit"] or "default",
                    when(row["created_at"]),
                    f"revoked {when(row['revoked_at'])}" if row["revoked_at"] else "active",
                    row["source"],
                ]
                for row in rows
            ],
            width=console.width,
            keep=("key id",),
            hide=("source", "created (UTC)", "rate limit", "types"),
        )
    )
    if not rows:
        console.print("no producers yet: `compensa producers add NAME --types order.created`", highlight=False)


@app.command("revoke")
@command
async def producers_revoke(
    name_or_key_id: Annotated[str, typer.Argument(help="A key id (one key) or a producer name (all its keys).")],
    as_json: JsonOpt = False,
) -> None:
    """Revoke API keys; requests with them get 401 (within COMPENSA_API_KEY_CACHE_SECONDS)."""
    from infra.clock import SystemClock
    from producers.ingest import ProducerStore

    engine = open_engine()
    try:
        count = await ProducerStore(engine).revoke(name_or_key_id, SystemClock().now())
        await audited(
            engine,
            "producers.revoke",
            [name_or_key_id],
            outcome="ok" if count else "refused",
            detail=f"revoked {count} key(s)" if count else "no active key with this id or producer name",
        )
    finally:
        await engine.dispose()
    if count == 0:
        fail(
            f"no active key with id or producer name {clip(name_or_key_id)} "
            "(`compensa producers list`; keys in a keys file are removed by editing it)"
        )
    if as_json:
        print_json({"revoked": count, "target": name_or_key_id})
        return
    console.print(cell(f"revoked {count} key(s) of {name_or_key_id!r}"))
