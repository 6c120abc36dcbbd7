"""`compensa api`: serve the HTTP ingest API (the app is built by `infra/api.py`)."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from infra.cli.common import (
    USAGE_EXIT,
    MetricsPortOpt,
    ServeJsonOpt,
    command,
    fail,
    long_running,
    require_schema,
    server_log_config,
)
from infra.settings import get_settings


@command
@long_running
def api(
    host: Annotated[str | None, typer.Option(help="Listen address (default COMPENSA_API_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default COMPENSA_API_PORT).")] = None,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Worker processes.")] = 1,
    access_log: Annotated[bool, typer.Option("--access-log/--no-access-log", help="uvicorn's per-request log line.")] = False,
    metrics_port: MetricsPortOpt = None,
    as_json: ServeJsonOpt = False,
) -> None:
    """Serve the HTTP ingest API (POST /v1/events, /v1/events:batch; docs at /docs)."""
    import os

    import uvicorn

    settings = get_settings()
    if not settings.redis_url:
        fail("the ingest API needs Redis: set COMPENSA_REDIS_URL")
    if workers > 1 and (metrics_port or settings.metrics_port):
        fail(
            "/metrics is served by one process: run --workers 1 per process (scale with processes) "
            "or leave the metrics port unset",
            USAGE_EXIT,
        )
    # Checked here, in one line, rather than as a failure in every request.
    asyncio.run(require_schema())
    if metrics_port is not None:
        # The app factory runs in the serving process and reads its settings from there.
        os.environ["COMPENSA_METRICS_PORT"] = str(metrics_port)
        get_settings.cache_clear()
    if as_json:
        # Each worker configures logging from the environment: the same JSON lines as this process.
        os.environ["COMPENSA_LOG_FORMAT"] = "json"
        get_settings.cache_clear()
    uvicorn.run(
        "infra.api:app_from_environment",
        factory=True,
        host=host or settings.api_host,
        port=port or settings.api_port,
        workers=workers,
        access_log=access_log,
        log_level=settings.log_level.lower(),
        log_config=server_log_config(settings.log_level, as_json),
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
        loop=settings.event_loop,  # uvicorn's names: auto (uvloop when installed), uvloop, asyncio
    )
