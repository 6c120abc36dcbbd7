"""`compensa contracts export`: JSON Schema and AsyncAPI for the message contracts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from infra.cli.common import console

app = typer.Typer(help="Message contracts.", no_args_is_help=True)


@app.command("export")
def contracts_export(
    out: Annotated[Path, typer.Option(help="Directory to write schemas/ and asyncapi.json into.")] = Path("docs/contracts"),
) -> None:
    """Write JSON Schema for every message and an AsyncAPI document for the topology."""
    from contracts.export import asyncapi, json_schemas
    from infra import topology as t

    schemas_dir = out / "schemas"
    schemas_dir.mkdir(parents=True, exist_ok=True)
    schemas = json_schemas()
    for name, schema in schemas.items():
        (schemas_dir / f"{name}.json").write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
    document = asyncapi((q.name, q.exchange.name, q.routing_keys) for q in t.WORK_QUEUES)
    (out / "asyncapi.json").write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    console.print(f"wrote {len(schemas)} JSON Schemas to {schemas_dir} and {out / 'asyncapi.json'}")
