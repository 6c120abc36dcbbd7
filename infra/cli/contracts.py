"""`compensa contracts export`: JSON Schema, AsyncAPI and its HTML page for the message contracts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from infra.cli.common import command, console, fail, print_json

app = typer.Typer(help="Message contracts.", no_args_is_help=True)


@app.command("export")
@command
def contracts_export(
    out: Annotated[Path, typer.Option(help="Directory to write schemas/, asyncapi.json and asyncapi.html into.")] = Path(
        "docs/contracts"
    ),
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print what was written (paths, schema count) as one JSON document; the documents themselves "
            'go to --out. A failure is {"ok": false, "error": "…"}.',
        ),
    ] = False,
) -> None:
    """Write JSON Schema for every message, an AsyncAPI document of the topology and its HTML page.

    The delay queues are those `topology declare` declares with the current retry
    settings (COMPENSA_MAX_ATTEMPTS, COMPENSA_RETRY_BASE_SECONDS / _MAX_SECONDS).
    """
    from importlib.metadata import PackageNotFoundError, version

    from contracts.asyncapi_html import render_html
    from contracts.export import asyncapi, json_schemas
    from infra import topology as t
    from infra.settings import get_settings

    settings = get_settings()
    schemas_dir = out / "schemas"
    schemas = json_schemas()
    delays = t.retry_delays_ms(settings.max_attempts, settings.retry_base_seconds, settings.retry_max_seconds)
    try:
        release = version("compensa")
    except PackageNotFoundError:  # run from a source tree that was never installed
        release = "0.0.0"
    document = asyncapi(t.amqp_topology(delays, settings.queue_type), version=release)
    try:
        schemas_dir.mkdir(parents=True, exist_ok=True)
        for name, schema in schemas.items():
            (schemas_dir / f"{name}.json").write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        (out / "asyncapi.json").write_text(json.dumps(document, indent=2) + "\n")
        (out / "asyncapi.html").write_text(render_html(document))
    except OSError as exc:
        # Not "cannot reach a server", which is what an OSError means elsewhere.
        fail(f"--out: cannot write into {out}: {exc.strerror or exc}")
    if as_json:
        print_json(
            {
                "schemas": len(schemas),
                "schemas_dir": str(schemas_dir),
                "asyncapi": str(out / "asyncapi.json"),
                "html": str(out / "asyncapi.html"),
            }
        )
        return
    console.print(
        f"wrote {len(schemas)} JSON Schemas to {schemas_dir}, {out / 'asyncapi.json'} and {out / 'asyncapi.html'}",
        highlight=False,
        markup=False,
    )
