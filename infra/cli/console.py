"""`compensa console`: serve the operator console (the app is built by `infra/console/app.py`)."""

from __future__ import annotations

from typing import Annotated

import typer

from infra.cli.common import err
from infra.settings import get_settings


def console(
    host: Annotated[str | None, typer.Option(help="Listen address (default COMPENSA_CONSOLE_HOST, 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="Port (default COMPENSA_CONSOLE_PORT, 8090).")] = None,
    access_log: Annotated[bool, typer.Option("--access-log/--no-access-log", help="uvicorn's per-request log line.")] = False,
) -> None:
    """Serve the operator console: sagas, dead letters, replay, audit; sign in with `compensa operators add`."""
    import uvicorn

    from infra.logging import configure_logging

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    if settings.console_secret is None:
        err.print(
            "note: COMPENSA_CONSOLE_SECRET is unset: sessions are signed with a key of this process, "
            "so a restart signs everybody out",
            highlight=False,
            markup=False,
        )
    uvicorn.run(
        "infra.console.app:app_from_environment",
        factory=True,
        host=host or settings.console_host,
        port=port or settings.console_port,
        workers=1,
        access_log=access_log,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
    )
