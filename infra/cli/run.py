"""`compensa run` and `compensa relay`: the long-running processes (top-level commands)."""

from __future__ import annotations

from typing import Annotated

import typer

from infra.cli.common import (
    MetricsPortOpt,
    ServeJsonOpt,
    command,
    fail,
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
) -> None:
    """Run services (all by default) until SIGTERM/SIGINT, then stop gracefully."""
    from infra.bootstrap import RUNNABLE_SERVICES
    from infra.clock import SystemClock
    from infra.runtime import Runtime
    from infra.settings import get_settings

    unknown = sorted(set(service) - set(RUNNABLE_SERVICES))
    if unknown:
        fail(f"unknown service(s) {', '.join(unknown)}; choose from {', '.join(RUNNABLE_SERVICES)}")
    # Named after what it runs (OTEL_SERVICE_NAME wins): "compensa" runs everything.
    chosen = sorted(set(service))
    start_telemetry("compensa-" + "-".join(chosen) if chosen else "compensa", metrics_port)
    settings = get_settings()
    await require_schema()
    engine = open_engine()
    transport = await open_transport()
    try:
        runtime = Runtime(engine, transport, SystemClock(), settings, service or list(RUNNABLE_SERVICES), relays=not no_relay)
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
) -> None:
    """Relay outbox rows to the broker until SIGTERM/SIGINT."""
    from infra.bootstrap import OUTBOX_SERVICES
    from infra.clock import SystemClock
    from infra.runtime import Runtime
    from infra.settings import get_settings

    names = service or list(OUTBOX_SERVICES)
    unknown = sorted(set(names) - set(OUTBOX_SERVICES))
    if unknown:
        fail(f"unknown outbox(es) {', '.join(unknown)}; choose from {', '.join(OUTBOX_SERVICES)}")
    start_telemetry("compensa-relay", metrics_port)
    await require_schema()
    engine = open_engine()
    transport = await open_transport()
    try:
        # A relay process is a runtime with no consumers: the same relay start-up as `run`.
        await Runtime(engine, transport, SystemClock(), get_settings(), outboxes=names).run_until_signalled()
    finally:
        await transport.close()
        await engine.dispose()
