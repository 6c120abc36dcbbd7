"""`compensa producers add|list|revoke`: API keys of upstream producers (HTTP ingest)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from infra.cli.common import audited, cell, clip, command, console, err, fail, open_engine, print_json
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
async def producers_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
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
    table = Table("producer", "key id", "types", "rate limit", "created", "state", "source")
    table.columns[1].no_wrap, table.columns[1].overflow = True, "fold"  # `producers revoke` needs the whole key id
    for row in rows:
        state = f"revoked {row['revoked_at']}" if row["revoked_at"] else "active"
        table.add_row(
            cell(row["name"]),
            cell(row["key_id"]),
            cell(", ".join(row["types"])),
            str(row["rate_limit"] or "default"),
            cell(row["created_at"] or ""),
            cell(state),
            cell(row["source"]),
        )
    console.print(table)


@app.command("revoke")
@command
async def producers_revoke(
    name_or_key_id: Annotated[str, typer.Argument(help="A key id (one key) or a producer name (all its keys).")],
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
    console.print(cell(f"revoked {count} key(s) of {name_or_key_id!r}"))
