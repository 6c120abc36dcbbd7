"""`compensa bench relay|saga|simulate|api|replay`: the benchmarks (in `infra/bench/`), printed.

Each needs real servers (scripts/bench.sh starts them); they print figures and ratios
and are never timed tests.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from infra.bench.common import environment_urls, figure
from infra.cli.common import command, console, err, fail, unwrapped
from infra.settings import get_settings

app = typer.Typer(help="Benchmarks (need PostgreSQL and RabbitMQ; see scripts/bench.sh).", no_args_is_help=True)


def _figure(label: str, value: float, unit: str = "") -> None:
    console.print(figure(label, value, unit), highlight=False)


@app.command("relay")
@command
async def bench_relay(
    messages: Annotated[int, typer.Option(min=100, help="Messages per path.")] = 20_000,
    memory_messages: Annotated[int, typer.Option(min=0, help="Rows relayed while sampling RSS (0 = skip).")] = 100_000,
) -> None:
    """Raw publish-with-confirm + consume vs commit → outbox → relay → consume with inbox."""
    from infra.bench.limits import raw_pipelined_rate
    from infra.bench.relay import outbox_rate, relay_memory
    from infra.logging import configure_logging

    configure_logging("WARNING", "json")
    database_url, amqp_url = environment_urls()
    console.print(f"relay benchmark: {messages:,} messages per path, same PostgreSQL and RabbitMQ", highlight=False)
    raw = await raw_pipelined_rate(amqp_url, messages)
    single = await outbox_rate(database_url, amqp_url, messages, batch=1)
    outbox = await outbox_rate(database_url, amqp_url, messages)
    relayed = await outbox_rate(database_url, amqp_url, messages, precommitted=True)
    raw_again = await raw_pipelined_rate(amqp_url, messages)
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
        memory = await relay_memory(database_url, amqp_url, memory_messages)
        _figure(f"relay only, {memory['messages']:,.0f} pre-committed rows", memory["relay_only_per_s"], "msgs/s")
        console.print(
            f"  relay RSS: start {memory['rss_start_mb']:.0f} MB, after 10k {memory['rss_after_10k_mb']:.0f} MB, "
            f"end {memory['rss_end_mb']:.0f} MB, max {memory['rss_max_mb']:.0f} MB",
            highlight=False,
        )


@app.command("saga")
@command
async def bench_saga(
    inflight: Annotated[list[int], typer.Option("--inflight", help="Concurrent sagas (repeatable).")] = [1, 10, 50],  # noqa: B006
    seconds: Annotated[float, typer.Option(min=1.0, help="Seconds per level.")] = 15.0,
    processes: Annotated[bool, typer.Option("--processes", help="Also run the services as separate OS processes.")] = False,
    peer: Annotated[bool, typer.Option("--peer/--no-peer", help="Also run the same saga as a DBOS workflow.")] = True,
) -> None:
    """Completed sagas/s and p50/p99 latency, with the machine's limit and a DBOS peer."""
    from infra.bench.limits import postgres_commit_rate, raw_broker_rate
    from infra.bench.saga import saga_rate
    from infra.logging import configure_logging

    configure_logging("WARNING", "json")
    database_url, amqp_url = environment_urls()
    pg = await postgres_commit_rate(database_url)
    broker = await raw_broker_rate(amqp_url, 10_000)
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
            result = await saga_rate(database_url, amqp_url, level, seconds, processes=separate)
            compensa_rates.setdefault(level, result["sagas_per_s"])
            console.print(
                f"  {level:>3} in flight: {result['sagas_per_s']:7.1f} sagas/s  p50 {result['p50_ms']:6.0f} ms  "
                f"p99 {result['p99_ms']:6.0f} ms  ({result['completed']:.0f} completed; "
                f"{result['sagas_per_s'] / limit:.2f} of ceiling)",
                highlight=False,
            )
    if not peer:
        return
    try:
        import dbos  # noqa: F401 - only to know whether the peer can run

        from infra.bench.peer_dbos import dbos_saga_rate
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


@app.command("simulate")
def bench_simulate(
    sagas: Annotated[int, typer.Option(min=10)] = 10_000,
    faults: Annotated[str, typer.Option()] = "chaos",
    real_sagas: Annotated[int, typer.Option(min=0, help="Sagas for the real-stack rate in the same run (0: skip).")] = 300,
) -> None:
    """Simulated sagas per wall second, and its ratio to the real stack's end-to-end rate."""
    from infra.bench.simulate import real_stack_rate, simulation_rate
    from infra.logging import configure_logging

    configure_logging("CRITICAL", "json")
    real = None
    if real_sagas:
        try:
            database_url, amqp_url = environment_urls()
        except ValueError as exc:
            err.print(f"real-stack rate skipped: {exc}", highlight=False, markup=False)
        else:
            from infra.simulation.realstack import RealStackError

            try:
                real = asyncio.run(real_stack_rate(database_url, amqp_url, real_sagas, faults))
            except RealStackError as exc:
                err.print(f"real-stack rate skipped: {exc}", highlight=False, markup=False)
        if real is not None:
            console.print(
                f"real stack, {real_sagas:,} sagas ({faults}, faults it can inject): "
                f"{real['wall_s']:.1f} s from first order to last saga settled, "
                f"{real['sagas_per_s']:.1f} sagas/s, outcomes {real['outcomes']}, "
                f"invariants {'hold' if real['invariants_ok'] else 'VIOLATED'}",
                highlight=False,
            )
    result = simulation_rate(sagas, faults)
    console.print(
        f"simulated {sagas:,} sagas ({faults}): {result['wall_s']:.1f} s wall, {result['sagas_per_s']:.1f} sagas/s, "
        f"outcomes {result['outcomes']}, RSS growth {result['rss_growth_mb']:.0f} MB, "
        f"invariants {'hold' if result['invariants_ok'] else 'VIOLATED'}",
        highlight=False,
    )
    if real is not None:
        console.print(f"ratio simulated / real stack: {result['sagas_per_s'] / real['sagas_per_s']:.1f}", highlight=False)


@app.command("api")
@command
async def bench_api(
    clients: Annotated[list[int], typer.Option("--clients", help="Concurrent clients (repeatable).")] = [1, 50],  # noqa: B006
    seconds: Annotated[float, typer.Option(min=1.0, help="Seconds per measurement.")] = 10.0,
    workers: Annotated[int, typer.Option(min=1, max=64, help="`compensa api` worker processes.")] = 1,
) -> None:
    """Accepted events/s through the API (with Idempotency-Keys) vs bare outbox inserts; p50/p99.

    Needs PostgreSQL and Redis (COMPENSA_DATABASE_URL, COMPENSA_REDIS_URL); empties the
    ingest outbox before and after, so point it at benchmark servers only.
    """
    from infra.bench.api import api_rate

    settings = get_settings()
    if not settings.database_url.startswith("postgresql") or not settings.redis_url:
        fail("bench api needs COMPENSA_DATABASE_URL=postgresql+asyncpg://… and COMPENSA_REDIS_URL=redis://…")
    console.print(
        f"api benchmark: {seconds:g} s per level, `compensa api` with {workers} worker(s), "
        "keep-alive HTTP clients in this process; "
        "bare = one INSERT into ingest_outbox per transaction",
        highlight=False,
    )
    for result in await api_rate(settings, sorted(set(clients)), seconds, workers):
        bare, through = result["bare"], result["api"]
        console.print(
            f"  {result['clients']:>3} clients: api {through['per_s']:8.1f} events/s  p50 {through['p50_ms']:6.1f} ms  "
            f"p99 {through['p99_ms']:6.1f} ms | bare outbox {bare['per_s']:8.1f} inserts/s  p50 {bare['p50_ms']:6.1f} ms  "
            f"p99 {bare['p99_ms']:6.1f} ms | ratio {result['ratio']:.2f}",
            highlight=False,
        )


@app.command("replay")
@command
async def bench_replay(
    messages: Annotated[int, typer.Option(min=100, help="Dead letters to archive and replay.")] = 10_000,
    batch_size: Annotated[int, typer.Option(min=1, max=10_000, help="Dead letters per replay transaction.")] = 200,
) -> None:
    """Replay N archived dead letters (with the progress bar), then relay them: replayed/s vs relay msgs/s."""
    from infra.bench.dlq import replay_rate

    database_url, amqp_url = environment_urls()
    unwrapped.print(f"replay benchmark: {messages:,} dead letters, same PostgreSQL and RabbitMQ", highlight=False)
    result = await replay_rate(database_url, amqp_url, messages, batch_size=batch_size, console=err)
    for label, key, unit in (
        ("archive (DLQ → dead_letters, acked after commit)", "archive_per_s", "msgs/s"),
        ("replay (validate → dlq outbox + mark replayed)", "replay_per_s", "msgs/s"),
        ("relay of the replayed rows (publish with confirms)", "relay_per_s", "msgs/s"),
    ):
        unwrapped.print(figure(label, result[key], unit), highlight=False)
    unwrapped.print(
        f"  ratio replay / relay: {result['replay_per_s'] / result['relay_per_s']:.2f}  (target ≥ 0.5)", highlight=False
    )
    unwrapped.print(f"  delivered to the bench queue: {result['delivered']:,.0f} of {messages:,}", highlight=False)
