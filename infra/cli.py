"""The `compensa` command line."""

from __future__ import annotations

import asyncio
import functools
import json
import sys
from collections.abc import Callable, Coroutine
from datetime import UTC
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from contracts import CompensaError
from infra.cli_ops import (
    bench_replay,
    cell,
    clip,
    detail_table,
    dlq_app,
    health,
    one_line_table,
    saga_cancel,
    saga_retry,
    visible,
)

app = typer.Typer(
    name="compensa",
    help="Event-driven order saga on RabbitMQ with a transactional outbox.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
topology_app = typer.Typer(help="Broker topology.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
contracts_app = typer.Typer(help="Message contracts.", no_args_is_help=True)
outbox_app = typer.Typer(help="Transactional outbox.", no_args_is_help=True)
order_app = typer.Typer(help="Orders.", no_args_is_help=True)
stock_app = typer.Typer(help="Stock levels.", no_args_is_help=True)
saga_app = typer.Typer(help="Saga inspection.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks (need PostgreSQL and RabbitMQ; see scripts/bench.sh).", no_args_is_help=True)
app.add_typer(topology_app, name="topology")
app.add_typer(db_app, name="db")
app.add_typer(contracts_app, name="contracts")
app.add_typer(outbox_app, name="outbox")
app.add_typer(order_app, name="order")
app.add_typer(stock_app, name="stock")
app.add_typer(saga_app, name="saga")
app.add_typer(bench_app, name="bench")
app.add_typer(dlq_app, name="dlq")

console = Console()
err = Console(stderr=True, soft_wrap=True)  # an error stays one line, whatever the width


class CliError(Exception):
    """A failure the user can fix; printed as one line, exit code 1."""


def fail(message: str) -> None:
    raise CliError(message)


def _explain(exc: BaseException) -> str | None:
    """Turn infrastructure failures into a sentence that says what failed and how to fix it."""
    from sqlalchemy.exc import DBAPIError

    from infra.cli_ops import explain_database_error

    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, CliError | CompensaError | ValueError):
        return text
    if isinstance(exc, DBAPIError):
        # Only a failure to connect is "unreachable"; a refused statement says what was refused.
        return explain_database_error(exc)
    if isinstance(exc, ConnectionError | OSError | TimeoutError):
        return f"cannot reach a server ({text}); check COMPENSA_AMQP_URL / COMPENSA_DATABASE_URL / COMPENSA_REDIS_URL"
    return None


def print_error(explained: str) -> None:
    """One `error:` line on stderr; the message may quote stored data or input, so it is never markup."""
    from infra.logging import redact

    err.print(Text.assemble(("error:", "red"), " ", visible(redact(explained))), highlight=False)


def command(fn: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Any]:
    """Run an async command body; print known failures as one line instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from infra.logging import configure_logging
        from infra.settings import get_settings

        settings = get_settings()
        configure_logging(settings.log_level, settings.log_format)
        try:
            return asyncio.run(fn(*args, **kwargs))
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
            explained = _explain(exc)
            if explained is None:
                raise
            print_error(explained)
            raise typer.Exit(1) from None

    return wrapper


def _engine():  # type: ignore[no-untyped-def]
    from infra.db import create_engine
    from infra.settings import get_settings

    return create_engine(get_settings().database_url)


async def _transport():  # type: ignore[no-untyped-def]
    from infra.settings import get_settings
    from infra.transport.factory import transport_from_settings

    return await transport_from_settings(get_settings())


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


# ---------------------------------------------------------------- simulate


def _parse_fault_overrides(values: list[str]) -> dict[str, float]:
    overrides = {}
    for item in values:
        name, sep, raw = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"expected NAME=RATE, got {item!r}", param_hint="--fault")
        try:
            overrides[name.strip().replace("-", "_")] = float(raw)
        except ValueError:
            raise typer.BadParameter(f"rate of {name!r} must be a number, got {raw!r}", param_hint="--fault") from None
    return overrides


@app.command()
def simulate(
    sagas: Annotated[int, typer.Option("--sagas", "-n", min=1, max=1_000_000, help="Number of orders.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed of the one RNG every choice draws from.")] = 1,
    faults: Annotated[str, typer.Option(help="Fault profile: none, default or chaos.")] = "default",
    fault: Annotated[list[str], typer.Option("--fault", help="Override one fault rate, NAME=RATE (repeatable).")] = [],  # noqa: B006
    skus: Annotated[int, typer.Option(min=1, max=10_000)] = 8,
    stock_per_sku: Annotated[int, typer.Option(min=0)] = 60,
    decline_rate: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.1,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON report on stdout.")] = False,
    report: Annotated[Path | None, typer.Option(help="Write report.json and report.html into this directory.")] = None,
    database_url: Annotated[str | None, typer.Option(help="Run on this database instead of a temporary SQLite file.")] = None,
    amqp_url: Annotated[str | None, typer.Option(help="Run the same workload on the real stack (RabbitMQ).")] = None,
    save_seed: Annotated[Path | None, typer.Option(help="On a violation, append the seed and options to this regression file.")] = None,
) -> None:
    """Run a deterministic saga simulation with injected faults and check every invariant."""
    from infra.logging import configure_logging
    from sagas.simulation import report as rendering
    from sagas.simulation.faults import profile
    from sagas.simulation.workload import WorkloadSpec

    # Injected faults log as errors by design; the report is the output that matters.
    configure_logging("CRITICAL", "json")
    try:
        rates = profile(faults, _parse_fault_overrides(fault))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--faults/--fault") from None
    spec = WorkloadSpec(sagas=sagas, skus=skus, stock_per_sku=stock_per_sku, decline_rate=decline_rate)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("simulating" if amqp_url is None else "running on the real stack"),
        BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, transient=True, disable=as_json or not err.is_terminal,
    )
    task = progress.add_task("sagas", total=sagas)

    def on_progress(done: int, _total: int) -> None:
        progress.update(task, completed=done)

    if amqp_url is not None:
        if database_url is None:
            raise typer.BadParameter("the real stack needs --database-url as well", param_hint="--amqp-url")
        from infra.realstack import REAL_FAULTS, real_stack_faults, run_real_stack

        _kept, ignored = real_stack_faults(rates)
        if ignored:
            err.print(
                f"note: the real stack injects only {', '.join(REAL_FAULTS)} (and declines); ignoring {', '.join(ignored)}",
                highlight=False, markup=False,
            )
        try:
            with progress:
                result = asyncio.run(
                    run_real_stack(seed, spec, amqp_url=amqp_url, database_url=database_url, faults=rates, on_progress=on_progress)
                )
        except Exception as exc:  # noqa: BLE001 - explained in one line, or re-raised
            explained = _explain(exc)
            if explained is None:
                raise
            print_error(explained)
            raise typer.Exit(1) from None
    else:
        from infra.simulate import SimulationOptions, run_simulation

        options = SimulationOptions(seed=seed, workload=spec, faults=rates, database_url=database_url)
        with progress:
            result = run_simulation(options, on_progress)

    document = rendering.to_document(result)
    if report is not None:
        report.mkdir(parents=True, exist_ok=True)
        (report / "report.json").write_text(rendering.dumps(document))
        (report / "report.html").write_text(rendering.html_page(document, list(result.durations.values())))
    if as_json:
        sys.stdout.write(rendering.dumps(document) + "\n")
    else:
        console.print(rendering.terminal_summary(document), highlight=False, markup=False)
        if report is not None:
            console.print(f"report written to {report / 'report.html'}", highlight=False)
    if not result.ok:
        if save_seed is not None:
            from sagas.simulation.regressions import save_regression

            save_regression(save_seed, seed=seed, sagas=sagas, faults=faults, overrides=_parse_fault_overrides(fault))
        raise typer.Exit(1)


# ---------------------------------------------------------------- schema, topology, contracts


@db_app.command("upgrade")
@command
async def db_upgrade(revision: str = "head") -> None:
    """Create or migrate every service's tables (idempotent)."""
    from infra.schema import current_revision, upgrade

    engine = _engine()
    try:
        await upgrade(engine, revision)
        console.print(cell(f"database at revision {await current_revision(engine)}"))
    finally:
        await engine.dispose()


@topology_app.command("declare")
@command
async def topology_declare() -> None:
    """Declare exchanges, work queues, delay queues and dead-letter queues (idempotent)."""
    from infra import topology as t

    transport = await _transport()
    try:
        await transport.declare_topology()
    finally:
        await transport.close()
    for queue in t.WORK_QUEUES:
        # Not markup: `[stock.reserve, …]` would be read as a style tag and vanish.
        console.print(f"{queue.name:<20} ← {queue.exchange.name} [{', '.join(queue.routing_keys)}]  dlq {queue.dlq}", highlight=False, markup=False)


@contracts_app.command("export")
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


# ---------------------------------------------------------------- services


@app.command()
@command
async def run(
    service: Annotated[list[str], typer.Option("--service", "-s", help="Run only these services (repeatable).")] = [],  # noqa: B006
    no_relay: Annotated[bool, typer.Option("--no-relay", help="Do not run relays in this process.")] = False,
) -> None:
    """Run services (all by default) until SIGTERM/SIGINT, then stop gracefully."""
    from infra.clock import SystemClock
    from infra.services import RUNNABLE_SERVICES, Runtime
    from infra.settings import get_settings

    unknown = sorted(set(service) - set(RUNNABLE_SERVICES))
    if unknown:
        fail(f"unknown service(s) {', '.join(unknown)}; choose from {', '.join(RUNNABLE_SERVICES)}")
    settings = get_settings()
    engine = _engine()
    transport = await _transport()
    try:
        runtime = Runtime(engine, transport, SystemClock(), settings, service or list(RUNNABLE_SERVICES), relays=not no_relay)
        await runtime.run_until_signalled()
    finally:
        await transport.close()
        await engine.dispose()


@app.command()
@command
async def relay(
    service: Annotated[list[str], typer.Option("--service", "-s", help="Outboxes to relay (default: all).")] = [],  # noqa: B006
) -> None:
    """Relay outbox rows to the broker until SIGTERM/SIGINT."""
    import signal

    from infra.clock import SystemClock
    from infra.services import OUTBOX_SERVICES
    from infra.settings import get_settings
    from outbox.notify import listen_for_outbox
    from outbox.relay import Relay

    names = service or list(OUTBOX_SERVICES)
    unknown = sorted(set(names) - set(OUTBOX_SERVICES))
    if unknown:
        fail(f"unknown outbox(es) {', '.join(unknown)}; choose from {', '.join(OUTBOX_SERVICES)}")
    settings = get_settings()
    engine = _engine()
    transport = await _transport()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    relays = {
        name: Relay(engine, name, transport, SystemClock(), batch_size=settings.relay_batch_size, poll_seconds=settings.relay_poll_seconds)
        for name in names
    }
    try:
        tasks = [asyncio.create_task(r.run(stop)) for r in relays.values()]
        if engine.dialect.name == "postgresql":
            tasks.append(asyncio.create_task(listen_for_outbox(engine, relays, stop)))
        await asyncio.gather(*tasks)
    finally:
        await transport.close()
        await engine.dispose()


@outbox_app.command("status")
@command
async def outbox_status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Pending outbox rows and the oldest pending age (relay lag), per service."""
    from infra.clock import SystemClock
    from infra.services import OUTBOX_SERVICES
    from outbox.uow import pending_summary

    engine = _engine()
    try:
        rows = [await pending_summary(engine, name, SystemClock().now()) for name in OUTBOX_SERVICES]
    finally:
        await engine.dispose()
    if as_json:
        _print_json(rows)
        return
    table = Table("service", "pending", "oldest pending (s)")
    for row in rows:
        table.add_row(row["service"], str(row["pending"]), f"{row['oldest_pending_age_seconds']:.1f}")
    console.print(table)


@order_app.command("place")
@command
async def order_place(
    customer: Annotated[str, typer.Option(help="Customer id.")],
    line: Annotated[list[str], typer.Option("--line", help="SKU:QUANTITY:UNIT_PRICE_MINOR (repeatable).")],
    token: Annotated[str, typer.Option(help="Payment token (never a card number).")],
    currency: Annotated[str, typer.Option()] = "EUR",
    order_id: Annotated[str | None, typer.Option(help="Idempotent order id (default: generated).")] = None,
) -> None:
    """Place an order: the order row and order.created commit in one transaction."""
    from consumers.orders import place_order
    from contracts import OrderLine
    from infra.clock import SystemClock

    lines = []
    for item in line:
        parts = item.split(":")
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            raise typer.BadParameter(f"expected SKU:QUANTITY:UNIT_PRICE_MINOR, got {item!r}", param_hint="--line")
        lines.append(OrderLine(sku=parts[0], quantity=int(parts[1]), unit_price=int(parts[2])))
    engine = _engine()
    try:
        placed = await place_order(engine, SystemClock(), order_id=order_id, customer_id=customer, lines=lines, currency=currency, payment_token=token)
    finally:
        await engine.dispose()
    console.print(cell(f"order {placed} placed"))


@stock_app.command("set")
@command
async def stock_set(
    sku: Annotated[str, typer.Argument(help="The SKU.")],
    on_hand: Annotated[int, typer.Argument(min=0, help="Units free to reserve.")],
) -> None:
    """Set a SKU's units on hand (creating it); reservations already held are kept."""
    from consumers.stock import seed_stock

    engine = _engine()
    try:
        await seed_stock(engine, {sku: on_hand})
    finally:
        await engine.dispose()
    console.print(cell(f"{sku}: {on_hand} on hand"))


@stock_app.command("list")
@command
async def stock_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Units on hand and reserved per SKU."""
    from consumers.stock import stock_levels

    engine = _engine()
    try:
        levels = await stock_levels(engine)
    finally:
        await engine.dispose()
    if as_json:
        _print_json({sku: {"on_hand": on_hand, "reserved": reserved} for sku, (on_hand, reserved) in levels.items()})
        return
    table = Table("sku", "on hand", "reserved")
    for sku, (on_hand, reserved) in sorted(levels.items()):
        table.add_row(cell(sku), str(on_hand), str(reserved))
    console.print(table)


@saga_app.command("list")
@command
async def saga_list(
    status: Annotated[str | None, typer.Option(help="Only sagas in this status.")] = None,
    older_than: Annotated[str | None, typer.Option("--older-than", help="Only sagas started longer ago than this (30s, 10m, 2h, 1d).")] = None,
    stuck_for: Annotated[str | None, typer.Option("--stuck-for", help="Only unfinished sagas not updated for this long.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List sagas, newest first."""
    from sqlalchemy import select

    from infra.cli_ops import saga_age_filters
    from sagas import SagaStatus
    from sagas.tables import saga_instances as s

    if status is not None and status not in {x.value for x in SagaStatus}:
        fail(f"unknown status {clip(status)}; choose from {', '.join(x.value for x in SagaStatus)}")
    engine = _engine()
    try:
        query = select(s.c.saga_id, s.c.status, s.c.step, s.c.reason, s.c.started_at, s.c.updated_at).order_by(s.c.updated_at.desc()).limit(limit)
        if status:
            query = query.where(s.c.status == status)
        query = saga_age_filters(query, older_than=older_than, stuck_for=stuck_for)
        async with engine.connect() as connection:
            rows = [dict(r._mapping) for r in (await connection.execute(query)).all()]
    finally:
        await engine.dispose()
    if as_json:
        _print_json(rows)
        return
    # Saga ids are never cut (`saga show` needs them whole); the other columns shrink to fit.
    console.print(one_line_table(
        ["saga", "status", "step", "reason", "started (UTC)", "updated (UTC)"],
        [[r["saga_id"], r["status"], r["step"], " ".join((r["reason"] or "").split()), _utc(r["started_at"]), _utc(r["updated_at"])] for r in rows],
        width=console.width, keep=("saga",), hide=("step", "started (UTC)", "updated (UTC)"),
    ))


@saga_app.command("show")
@command
async def saga_show(
    saga_id: str,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    mermaid: Annotated[bool, typer.Option("--mermaid", help="Print a Mermaid sequence diagram.")] = False,
) -> None:
    """Show a saga's state and every transition, in order."""
    from sqlalchemy import select

    from sagas.tables import saga_history as h
    from sagas.tables import saga_instances as s

    engine = _engine()
    try:
        async with engine.connect() as connection:
            saga = (await connection.execute(select(s).where(s.c.saga_id == saga_id))).one_or_none()
            if saga is None:
                fail(f"no saga {clip(saga_id)}; `compensa saga list` shows the known ones")
            history = [dict(r._mapping) for r in (await connection.execute(select(h).where(h.c.saga_id == saga_id).order_by(h.c.version))).all()]
    finally:
        await engine.dispose()
    for entry in history:
        try:
            entry["sent"] = json.loads(entry["sent"])
        except (ValueError, RecursionError):
            pass  # an old or damaged row: shown as stored
    if as_json:
        _print_json({"saga": dict(saga._mapping), "history": history})
        return
    if mermaid:
        sys.stdout.write(_mermaid(saga_id, history) + "\n")  # a document: never wrapped to the terminal's width
        return
    # Stored values are shown as Text: never parsed as markup, invisible characters escaped.
    console.print(Text.assemble(f"saga {visible(saga_id)}: ", (visible(saga.status), "bold"), f" (version {saga.version}) {visible(saga.reason or '')}"))
    table = detail_table("v", "at (UTC)", "trigger", "message", "causation", "from → to", "sent", "note")
    for e in history:
        table.add_row(
            cell(e["version"]), _utc(e["at"]), cell(e["trigger"]), cell((e["message_id"] or "-")[:8]), cell((e["causation_id"] or "-")[:8]),
            cell(f"{e['from_status'] or '-'} → {e['to_status']}"), cell(", ".join(_sent_types(e["sent"])) or "-"), cell(e["note"]),
        )
    console.print(table)


def _sent_types(sent: Any) -> list[str]:
    """Types of the messages a transition sent (its `sent` column, parsed when it parses)."""
    if not isinstance(sent, list):
        return [str(sent)]
    return [str(x.get("type")) if isinstance(x, dict) else str(x) for x in sent]


def _utc(moment: Any) -> str:
    from infra.dlq.query import aware

    return aware(moment).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def _mermaid(saga_id: str, history: list[dict[str, Any]]) -> str:
    participant_of = {"stock": "Stock", "payment": "Payments", "order": "Orders", "deadline": "Clock", "operator": "Operator"}
    lines = ["sequenceDiagram", "    participant Saga as Saga " + visible(saga_id)]
    for entry in history:
        source = participant_of.get(entry["trigger"].split(".")[0].split(":")[0], "Broker")
        lines.append(visible(f"    {source}->>Saga: {entry['trigger']} ({entry['from_status'] or 'new'} → {entry['to_status']})"))
        for kind in _sent_types(entry["sent"]):
            target = participant_of.get(kind.split(".")[0], "Broker")
            lines.append(f"    Saga->>{target}: {visible(kind)}")
    return "\n".join(lines)


# ---------------------------------------------------------------- benchmarks


def _figure(label: str, value: float, unit: str = "") -> None:
    console.print(f"  {label:<52} {value:>12,.1f} {unit}", highlight=False)


@bench_app.command("relay")
@command
async def bench_relay(
    messages: Annotated[int, typer.Option(min=100, help="Messages per path.")] = 20_000,
    memory_messages: Annotated[int, typer.Option(min=0, help="Rows relayed while sampling RSS (0 = skip).")] = 100_000,
) -> None:
    """Raw publish-with-confirm + consume vs commit → outbox → relay → consume with inbox."""
    from infra import bench
    from infra.logging import configure_logging

    configure_logging("WARNING", "json")
    database_url, amqp_url = bench.environment_urls()
    console.print(f"relay benchmark: {messages:,} messages per path, same PostgreSQL and RabbitMQ", highlight=False)
    raw = await bench.raw_pipelined_rate(amqp_url, messages)
    single = await bench.outbox_rate(database_url, amqp_url, messages, batch=1)
    outbox = await bench.outbox_rate(database_url, amqp_url, messages)
    relayed = await bench.outbox_rate(database_url, amqp_url, messages, precommitted=True)
    raw_again = await bench.raw_pipelined_rate(amqp_url, messages)
    raw_rate = (raw + raw_again) / 2
    _figure("raw aio-pika publish-with-confirm + consume", raw_rate, "msgs/s")
    _figure("outbox commit → relay → consume with inbox (batched)", outbox["end_to_end_per_s"], "msgs/s")
    _figure("  the same, one message per consumer transaction", single["end_to_end_per_s"], "msgs/s")
    _figure("  outbox commits alone (20 writers, 1 message each)", outbox["outbox_commit_per_s"], "msgs/s")
    _figure("pre-committed rows → relay → consume with inbox (batched)", relayed["end_to_end_per_s"], "msgs/s")
    console.print(
        f"  ratio outbox / raw: {outbox['end_to_end_per_s'] / raw_rate:.2f} batched, "
        f"{single['end_to_end_per_s'] / raw_rate:.2f} unbatched; relay → consume alone "
        f"{relayed['end_to_end_per_s'] / raw_rate:.2f}  (raw runs: {raw:,.0f}, {raw_again:,.0f})",
        highlight=False,
    )
    if memory_messages:
        memory = await bench.relay_memory(database_url, amqp_url, memory_messages)
        _figure(f"relay only, {memory['messages']:,.0f} pre-committed rows", memory["relay_only_per_s"], "msgs/s")
        console.print(
            f"  relay RSS: start {memory['rss_start_mb']:.0f} MB, after 10k {memory['rss_after_10k_mb']:.0f} MB, "
            f"end {memory['rss_end_mb']:.0f} MB, max {memory['rss_max_mb']:.0f} MB",
            highlight=False,
        )


@bench_app.command("saga")
@command
async def bench_saga(
    inflight: Annotated[list[int], typer.Option("--inflight", help="Concurrent sagas (repeatable).")] = [1, 10, 50],  # noqa: B006
    seconds: Annotated[float, typer.Option(min=1.0, help="Seconds per level.")] = 15.0,
    processes: Annotated[bool, typer.Option("--processes", help="Also run the services as separate OS processes.")] = False,
    peer: Annotated[bool, typer.Option("--peer/--no-peer", help="Also run the same saga as a DBOS workflow.")] = True,
) -> None:
    """Completed sagas/s and p50/p99 latency, with the machine's limit and a DBOS peer."""
    from infra import bench
    from infra.logging import configure_logging

    configure_logging("WARNING", "json")
    database_url, amqp_url = bench.environment_urls()
    pg = await bench.postgres_commit_rate(database_url)
    broker = await bench.raw_broker_rate(amqp_url, 10_000)
    limit = min(pg / 11, broker["publish_confirm_per_s"] / 9, broker["consume_ack_per_s"] / 9)
    console.print("limits of this machine for the saga's work (11 transactions, 9 messages per saga):", highlight=False)
    _figure("PostgreSQL commits/s (inbox + update + outbox, 20 conns)", pg, "tx/s")
    _figure("RabbitMQ persistent publish-with-confirm", broker["publish_confirm_per_s"], "msgs/s")
    _figure("RabbitMQ consume with ack", broker["consume_ack_per_s"], "msgs/s")
    _figure("=> ceiling", limit, "sagas/s")
    layouts = [("one process", False)] + ([("3 processes", True)] if processes else [])
    compensa_rates: dict[int, float] = {}
    for label, separate in layouts:
        console.print(f"compensa, {label}:", highlight=False)
        for level in inflight:
            result = await bench.saga_rate(database_url, amqp_url, level, seconds, processes=separate)
            compensa_rates.setdefault(level, result["sagas_per_s"])
            console.print(
                f"  {level:>3} in flight: {result['sagas_per_s']:7.1f} sagas/s  p50 {result['p50_ms']:6.0f} ms  "
                f"p99 {result['p99_ms']:6.0f} ms  ({result['completed']:.0f} completed; {result['sagas_per_s'] / limit:.2f} of ceiling)",
                highlight=False,
            )
    if not peer:
        return
    try:
        import dbos  # noqa: F401 - only to know whether the peer can run

        from infra.peer_dbos import dbos_saga_rate
    except ImportError:
        err.print("DBOS peer skipped: DBOS is not installed (pip install 'compensa[bench]')", highlight=False, markup=False)
        return
    console.print("DBOS peer, the same saga as a workflow (5 checkpointed transactions, no broker):", highlight=False)
    from infra.db import scratch_database

    async with scratch_database(database_url) as scratch_url:
        for result in await dbos_saga_rate(scratch_url, inflight, seconds):
            level = int(result["inflight"])
            console.print(
                f"  {level:>3} in flight: {result['sagas_per_s']:7.1f} sagas/s  p50 {result['p50_ms']:6.0f} ms  "
                f"p99 {result['p99_ms']:6.0f} ms  ({result['completed']:.0f} completed; "
                f"compensa / DBOS = {compensa_rates[level] / result['sagas_per_s']:.2f})",
                highlight=False,
            )


@bench_app.command("simulate")
def bench_simulate(
    sagas: Annotated[int, typer.Option(min=10)] = 10_000,
    faults: Annotated[str, typer.Option()] = "chaos",
    real_sagas: Annotated[int, typer.Option(min=0, help="Sagas for the real-stack rate in the same run (0: skip).")] = 300,
) -> None:
    """Simulated sagas per wall second, and its ratio to the real stack's end-to-end rate."""
    from infra import bench
    from infra.logging import configure_logging

    configure_logging("CRITICAL", "json")
    real = None
    if real_sagas:
        try:
            database_url, amqp_url = bench.environment_urls()
        except ValueError as exc:
            err.print(f"real-stack rate skipped: {exc}", highlight=False, markup=False)
        else:
            from infra.realstack import RealStackError

            try:
                real = asyncio.run(bench.real_stack_rate(database_url, amqp_url, real_sagas, faults))
            except RealStackError as exc:
                err.print(f"real-stack rate skipped: {exc}", highlight=False, markup=False)
        if real is not None:
            console.print(
                f"real stack, {real_sagas:,} sagas ({faults}, faults it can inject): {real['wall_s']:.1f} s from first order to last saga settled, "
                f"{real['sagas_per_s']:.1f} sagas/s, outcomes {real['outcomes']}, "
                f"invariants {'hold' if real['invariants_ok'] else 'VIOLATED'}",
                highlight=False,
            )
    result = bench.simulation_rate(sagas, faults)
    console.print(
        f"simulated {sagas:,} sagas ({faults}): {result['wall_s']:.1f} s wall, {result['sagas_per_s']:.1f} sagas/s, "
        f"outcomes {result['outcomes']}, RSS growth {result['rss_growth_mb']:.0f} MB, "
        f"invariants {'hold' if result['invariants_ok'] else 'VIOLATED'}",
        highlight=False,
    )
    if real is not None:
        console.print(f"ratio simulated / real stack: {result['sagas_per_s'] / real['sagas_per_s']:.1f}", highlight=False)


import infra.cli_api  # noqa: E402,F401 - registers `api`, `producers` and `bench api`


# Operator commands (infra/cli_ops.py), after the built-in ones of each group.
saga_app.command("retry")(saga_retry)
saga_app.command("cancel")(saga_cancel)
app.command("health")(health)
bench_app.command("replay")(bench_replay)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
