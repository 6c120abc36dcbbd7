"""`compensa run` and `compensa relay`: the long-running processes (top-level commands)."""

from __future__ import annotations

from typing import Annotated

import typer

from infra.cli.common import (
    AppOpt,
    MetricsPortOpt,
    ServeJsonOpt,
    command,
    fail,
    load_app_or_exit,
    long_running,
    open_engine,
    open_transport,
    require_schema,
    start_telemetry,
)


@command
@long_running
async def run(
    service: Annotated[list[str], typer.Option("--service", "-s", help="Run only these services (repeatable).")] = [],  # noqa: B006
    no_relay: Annotated[bool, typer.Option("--no-relay", help="Do not run relays in this process.")] = False,
    metrics_port: MetricsPortOpt = None,
    as_json: ServeJsonOpt = False,
    app: AppOpt = None,
) -> None:
    """Run services (all by default) until SIGTERM/SIGINT, then stop gracefully."""
    from infra.bootstrap import ARCHIVE_SERVICE, message_services
    from infra.clock import SystemClock
    from infra.runtime import Runtime
    from infra.settings import get_settings

    hosted = load_app_or_exit(app)
    runnable = [*message_services(hosted), ARCHIVE_SERVICE]
    unknown = sorted(set(service) - set(runnable))
    if unknown:
        fail(f"unknown service(s) {', '.join(unknown)}; choose from {', '.join(runnable)}")
    # Named after what it runs (OTEL_SERVICE_NAME wins): "compensa" runs everything.
    chosen = sorted(set(service))
    start_telemetry("compensa-" + "-".join(chosen) if chosen else "compensa", metrics_port)
    settings = get_settings()
    await require_schema()
    engine = open_engine()
    transport = await open_transport(hosted)
    try:
        runtime = Runtime(engine, transport, SystemClock(), settings, service or runnable, relays=not no_relay, app=hosted)
        await runtime.run_until_signalled()
    finally:
        await transport.close()
        await engine.dispose()


@command
@long_running
async def relay(
    service: Annotated[list[str], typer.Option("--service", "-s", help="Outboxes to relay (default: all).")] = [],  # noqa: B006
    metrics_port: MetricsPortOpt = None,
    as_json: ServeJsonOpt = False,
    app: AppOpt = None,
) -> None:
    """Relay outbox rows to the broker until SIGTERM/SIGINT."""
    from infra.bootstrap import outbox_services
    from infra.clock import SystemClock
    from infra.runtime import Runtime
    from infra.settings import get_settings

    hosted = load_app_or_exit(app)
    every = outbox_services(hosted)
    names = service or list(every)
    unknown = sorted(set(names) - set(every))
    if unknown:
        fail(f"unknown outbox(es) {', '.join(unknown)}; choose from {', '.join(every)}")
    start_telemetry("compensa-relay", metrics_port)
    await require_schema()
    engine = open_engine()
    transport = await open_transport(hosted)
    try:
        # A relay process is a runtime with no consumers: the same relay start-up as `run`.
        await Runtime(engine, transport, SystemClock(), get_settings(), outboxes=names, app=hosted).run_until_signalled()
    finally:
        await transport.close()
        await engine.dispose()
