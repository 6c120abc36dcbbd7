"""`compensa console`: serve the operator console (the app is built by `infra/console/app.py`)."""

from __future__ import annotations

import asyncio
import os
from typing import Annotated

import typer

from infra.cli.common import (
    AppOpt,
    ServeJsonOpt,
    announce,
    command,
    load_app_or_exit,
    long_running,
    require_schema,
    server_log_config,
)
from infra.settings import get_settings


@command
@long_running
def console(
    host: Annotated[str | None, typer.Option(help="Listen address (default COMPENSA_CONSOLE_HOST, 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="Port (default COMPENSA_CONSOLE_PORT, 8090).")] = None,
    access_log: Annotated[bool, typer.Option("--access-log/--no-access-log", help="uvicorn's per-request log line.")] = False,
    as_json: ServeJsonOpt = False,
    app: AppOpt = None,
) -> None:
    """Serve the operator console: sagas, dead letters, replay, audit; sign in with `compensa operators add`.

    With --app, the app's sagas are the ones retried and cancelled, and its queues the ones
    dead letters are filtered by and replayed to.
    """
    import uvicorn

    from infra.console.app import APP_VARIABLE

    load_app_or_exit(app, as_json=as_json)  # refused here, in one line, rather than by the server's factory
    if app is not None:
        os.environ[APP_VARIABLE] = app  # the factory uvicorn calls in this process reads it
    settings = get_settings()
    # Sign-in reads the operators table: without it every page would fail, so say it once here.
    asyncio.run(require_schema())
    if settings.console_secret is None:
        announce(
            as_json,
            "console.ephemeral_secret",
            "note: COMPENSA_CONSOLE_SECRET is unset: sessions are signed with a key of this process, "
            "so a restart signs everybody out",
            level="warning",
        )
    uvicorn.run(
        "infra.console.app:app_from_environment",
        factory=True,
        host=host or settings.console_host,
        port=port or settings.console_port,
        workers=1,
        access_log=access_log,
        log_level=settings.log_level.lower(),
        log_config=server_log_config(settings.log_level, as_json),
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
        loop=settings.event_loop,  # uvicorn's names: auto (uvloop when installed), uvloop, asyncio
    )
