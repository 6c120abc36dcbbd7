"""`compensa health`: database, broker, queues, redis, relay lag, saga starts, deadlines, dead letters, breakers.

The checks are `infra/health.py`; this module runs them once (or serves them) and prints.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from infra.cli.common import (
    USAGE_EXIT,
    AppOpt,
    MetricsPortOpt,
    announce,
    command,
    fail,
    load_app_or_exit,
    long_running,
    print_json,
    server_log_config,
    start_telemetry,
)
from infra.cli.common import unwrapped as console


@command
@long_running
async def health(
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print the report as one JSON document; with --serve, log as JSON lines on stderr (the start-up line "
            'too) and a failure to start is {"ok": false, "error": "…"} on stdout.',
        ),
    ] = False,
    serve: Annotated[bool, typer.Option("--serve", help="Serve GET /health over HTTP instead (container checks).")] = False,
    host: Annotated[str, typer.Option(help="With --serve: address to bind.")] = "0.0.0.0",  # noqa: S104 - a container check listens on all interfaces
    port: Annotated[int, typer.Option(min=1, max=65535, help="With --serve: port.")] = 8081,
    max_relay_lag: Annotated[
        float, typer.Option(min=0.1, help="Seconds a pending outbox row may wait before the relay counts as lagging.")
    ] = 60.0,
    metrics_port: MetricsPortOpt = None,
    app: AppOpt = None,
) -> None:
    """Check database, broker, redis (when configured), relay lag and dead letters; exit 1 when unhealthy.

    With --app, the app's work queues, dead-letter queues and outboxes are the ones checked.
    """
    from infra.health import check_health, health_app
    from infra.settings import get_settings

    hosted = load_app_or_exit(app, as_json=as_json)
    settings = get_settings()
    if metrics_port is not None and not serve:
        fail("--metrics-port needs --serve (a one-off check has nothing to scrape)", USAGE_EXIT)
    start_telemetry("compensa-health" if serve else "compensa-cli", metrics_port if serve else None)
    if serve:
        import uvicorn

        server = uvicorn.Server(
            uvicorn.Config(
                health_app(settings, max_relay_lag_seconds=max_relay_lag, saga_app=hosted),
                host=host,
                port=port,
                log_level="warning",
                access_log=False,
                log_config=server_log_config("warning", as_json),
            )
        )
        announce(
            as_json,
            "health.serving",
            f"serving GET http://{host}:{port}/health (200 healthy, 503 unhealthy); Ctrl-C stops",
            host=host,
            port=port,
        )
        await server.serve()
        return
    report = await check_health(settings, max_relay_lag_seconds=max_relay_lag, app=hosted, app_reference=app)
    if as_json:
        print_json(report)
    else:
        print_health(report)
    if not report["ok"]:
        raise typer.Exit(1)


def print_health(report: dict[str, Any]) -> None:
    from rich.markup import escape

    table = Table("check", "ok", "detail")
    for name, check in report["checks"].items():
        if not check.get("ok"):
            detail = f"{check.get('error', 'failed')} — {check.get('fix', '')}".rstrip(" —")
        elif name == "database":
            detail = f"{check.get('url')} at revision {check.get('revision')} ({check.get('latency_ms')} ms)"
        elif name == "broker":
            detail = check.get("note") or f"{check.get('url')} ({check.get('latency_ms')} ms), topology declared"
        elif name == "queues":
            detail = check.get("note") or "; ".join(
                f"{q} {v['ready']} ready/{v['unacked']} unacked/{v['consumers']} consumers" for q, v in check["queues"].items()
            )
        elif name == "redis":
            detail = (
                f"{check.get('url')} ({check.get('latency_ms')} ms)"
                if check.get("configured")
                else "not configured (COMPENSA_REDIS_URL unset)"
            )
        elif name == "relay":
            detail = f"{check['pending']} pending, oldest {check['max_lag_seconds']:.1f}s (limit {check['limit_seconds']:.0f}s)"
        elif name == "saga_starts":
            detail = f"every order older than {check['limit_seconds']:g}s has its saga"
        elif name == "deadlines":
            detail = f"none overdue by more than {check['limit_seconds']:g}s"
        elif name == "circuit_breakers":
            detail = (
                "all closed: " + ", ".join(f"{c['circuit']} in {c['holder']}" for c in check["circuits"])
                if check["circuits"]
                else "none open (no transition recorded lately)"
            )
        elif name == "dead_letters":
            waiting = {q: v["waiting_in_dlq"] for q, v in check["queues"].items() if v["waiting_in_dlq"]}
            archived = {q: v["archived_new"] for q, v in check["queues"].items() if v["archived_new"]}
            detail = f"in DLQs {waiting or 0}; archived, status new {archived or 0}"
        else:
            detail = ""
        if check.get("ok"):
            mark = "[green]yes[/green]"
        elif check.get("unavailable"):
            mark = "[yellow]unknown[/yellow]"
        elif check.get("degraded"):
            mark = "[yellow]degraded[/yellow]"
        else:
            mark = "[red]NO[/red]"
        table.add_row(name, mark, escape(str(detail)))
    console.print(table, highlight=False)
    for warning in report["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False)
    console.print(f"[bold]{report['status']}[/bold]")
