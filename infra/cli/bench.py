"""`compensa bench relay|saga|simulate|api|faststream|replay|console`: the benchmarks (in `infra/bench/`), printed.

Each needs real servers (scripts/bench.sh starts them); they print figures and ratios
and are never timed tests. With `--json`, a command prints every figure it measured
(the ceiling, the peer's, the ratios) as one JSON document on stdout instead.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import typer

from infra.bench.common import environment_urls, figure
from infra.cli.common import JsonOpt, command, err, fail, print_json, unwrapped
from infra.settings import get_settings

app = typer.Typer(help="Benchmarks (need PostgreSQL and RabbitMQ; see scripts/bench.sh).", no_args_is_help=True)


class Report:
    """A benchmark's figures: printed as lines as they come, or kept for one JSON document."""

    def __init__(self, benchmark: str, as_json: bool) -> None:
        self.as_json = as_json
        self.data: dict[str, Any] = {"benchmark": benchmark}

    def say(self, line: str) -> None:
        if not self.as_json:
            unwrapped.print(line, highlight=False, markup=False)

    def figure(self, label: str, value: float, unit: str = "") -> None:
        self.say(figure(label, value, unit))

    def done(self) -> None:
        if self.as_json:
            print_json(self.data)


@app.command("relay")
@command
async def bench_relay(
    messages: Annotated[int, typer.Option(min=100, help="Messages per path.")] = 20_000,
    memory_messages: Annotated[int, typer.Option(min=0, help="Rows relayed while sampling RSS (0 = skip).")] = 100_000,
    as_json: JsonOpt = False,
) -> None:
    """Raw publish-with-confirm + consume vs commit → outbox → relay → consume with inbox."""
    from infra.bench.limits import raw_pipelined_rate
    from infra.bench.relay import outbox_rate, relay_memory
    from infra.logging import configure_logging

    configure_logging("WARNING", "json")
    database_url, amqp_url = environment_urls()
    report = Report("relay", as_json)
    report.say(f"relay benchmark: {messages:,} messages per path, same PostgreSQL and RabbitMQ")
    raw = await raw_pipelined_rate(amqp_url, messages)
    single = await outbox_rate(database_url, amqp_url, messages, batch=1, dispatch=True)
    outbox = await outbox_rate(database_url, amqp_url, messages, dispatch=True)
    swept = await outbox_rate(database_url, amqp_url, messages)
    relayed = await outbox_rate(database_url, amqp_url, messages, precommitted=True)
    raw_again = await raw_pipelined_rate(amqp_url, messages)
    raw_rate = (raw + raw_again) / 2
    report.data.update(
        messages=messages,
        raw_per_s=raw_rate,
        raw_runs_per_s=[raw, raw_again],
        outbox=outbox,
        outbox_unbatched=single,
        outbox_relay_only=swept,
        precommitted=relayed,
        ratio_outbox_to_raw=outbox["end_to_end_per_s"] / raw_rate,
        ratio_relay_only_to_raw=swept["end_to_end_per_s"] / raw_rate,
        ratio_unbatched_to_raw=single["end_to_end_per_s"] / raw_rate,
        ratio_relay_consume_to_raw=relayed["end_to_end_per_s"] / raw_rate,
    )
    report.figure("raw aio-pika publish-with-confirm + consume", raw_rate, "msgs/s")
    report.figure("outbox commit → dispatch → consume with inbox (batched)", outbox["end_to_end_per_s"], "msgs/s")
    report.figure("  the same, one message per consumer transaction", single["end_to_end_per_s"], "msgs/s")
    report.figure("  outbox commits alone (20 writers, 1 message each)", outbox["outbox_commit_per_s"], "msgs/s")
    report.figure("  no dispatcher: commit → relay → consume (batched)", swept["end_to_end_per_s"], "msgs/s")
    report.figure("pre-committed rows → relay → consume with inbox (batched)", relayed["end_to_end_per_s"], "msgs/s")
    report.say(
        f"  ratio outbox / raw: {report.data['ratio_outbox_to_raw']:.2f} batched, "
        f"{report.data['ratio_unbatched_to_raw']:.2f} unbatched, {report.data['ratio_relay_only_to_raw']:.2f} "
        "through the relay alone; pre-committed relay → consume "
        f"{report.data['ratio_relay_consume_to_raw']:.2f}  (raw runs: {raw:,.0f}, {raw_again:,.0f})"
    )
    if memory_messages:
        memory = await relay_memory(database_url, amqp_url, memory_messages)
        report.data["relay_memory"] = memory
        report.figure(f"relay only, {memory['messages']:,.0f} pre-committed rows", memory["relay_only_per_s"], "msgs/s")
        report.say(
            f"  relay RSS: start {memory['rss_start_mb']:.0f} MB, after 10k {memory['rss_after_10k_mb']:.0f} MB, "
            f"end {memory['rss_end_mb']:.0f} MB, max {memory['rss_max_mb']:.0f} MB"
        )
    report.done()


def _saga_line(result: dict[str, Any], ceiling: float) -> str:
    return (
        f"  {result['inflight']:>3} in flight: {result['sagas_per_s']:7.1f} sagas/s  p50 {result['p50_ms']:6.0f} ms  "
        f"p99 {result['p99_ms']:6.0f} ms  ({result['completed']:.0f} completed; {result['sagas_per_s'] / ceiling:.2f} of ceiling)"
    )


@app.command("saga")
@command
async def bench_saga(
    inflight: Annotated[list[int], typer.Option("--inflight", help="Concurrent sagas (repeatable).")] = [1, 10, 50],  # noqa: B006
    seconds: Annotated[float, typer.Option(min=1.0, help="Seconds per level.")] = 15.0,
    processes: Annotated[bool, typer.Option("--processes", help="Also run the services as separate OS processes.")] = False,
    peer: Annotated[bool, typer.Option("--peer/--no-peer", help="Also run the same saga as a DBOS workflow.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Completed sagas/s, p50/p99 latency and the cost per saga, with the machine's limit and a DBOS peer."""
    from infra.bench.cost import describe
    from infra.bench.limits import postgres_commit_rate, raw_broker_rate
    from infra.bench.saga import saga_rate
    from infra.logging import configure_logging
    from infra.settings import derive_management_url

    configure_logging("WARNING", "json")
    database_url, amqp_url = environment_urls()
    management_url = get_settings().amqp_management_url or derive_management_url(amqp_url)
    report = Report("saga", as_json)
    pg = await postgres_commit_rate(database_url)
    broker = await raw_broker_rate(amqp_url, 10_000)
    limit = min(pg / 11, broker["publish_confirm_per_s"] / 9, broker["consume_ack_per_s"] / 9)
    report.data["limits"] = {"postgres_commits_per_s": pg, **broker, "ceiling_sagas_per_s": limit}
    report.say("limits of this machine for the saga's work (11 transactions, 9 messages per saga):")
    report.figure("PostgreSQL commits/s (inbox + update + outbox, 20 conns)", pg, "tx/s")
    report.figure("RabbitMQ persistent publish-with-confirm", broker["publish_confirm_per_s"], "msgs/s")
    report.figure("RabbitMQ consume with ack", broker["consume_ack_per_s"], "msgs/s")
    report.figure("=> ceiling", limit, "sagas/s")
    layouts = [("one process", False)] + ([("3 processes", True)] if processes else [])
    compensa: dict[int, dict[str, Any]] = {}
    for label, separate in layouts:
        report.say(f"compensa, {label}:")
        results = report.data.setdefault("compensa", {}).setdefault("processes" if separate else "one_process", [])
        for level in inflight:
            result = await saga_rate(database_url, amqp_url, level, seconds, processes=separate, management_url=management_url)
            result["of_ceiling"] = result["sagas_per_s"] / limit
            results.append(result)
            compensa.setdefault(level, result)
            report.say(_saga_line(result, limit))
            report.say(f"       {describe(result['per_saga'])}")
    if peer:
        await _dbos_peer(report, database_url, inflight, seconds, compensa)
    report.done()


async def _dbos_peer(
    report: Report, database_url: str, inflight: list[int], seconds: float, compensa: dict[int, dict[str, Any]]
) -> None:
    try:
        import dbos  # noqa: F401 - only to know whether the peer can run

        from infra.bench.peer_dbos import dbos_saga_rate
    except ImportError:
        err.print("DBOS peer skipped: DBOS is not installed (pip install 'compensa[bench]')", highlight=False, markup=False)
        return
    report.say("DBOS peer, the same saga as a workflow (5 checkpointed transactions, no broker):")
    from infra.db import scratch_database

    peers = report.data["dbos"] = []
    async with scratch_database(database_url) as scratch_url:
        for result in await dbos_saga_rate(scratch_url, inflight, seconds):
            level = int(result["inflight"])
            ours = compensa[level]
            result["compensa_to_dbos"] = ours["sagas_per_s"] / result["sagas_per_s"]
            result["compensa_p50_to_dbos_p50"] = ours["p50_ms"] / result["p50_ms"]
            peers.append(result)
            report.say(
                f"  {level:>3} in flight: {result['sagas_per_s']:7.1f} sagas/s  p50 {result['p50_ms']:6.0f} ms  "
                f"p99 {result['p99_ms']:6.0f} ms  ({result['completed']:.0f} completed; "
                f"compensa / DBOS = {result['compensa_to_dbos']:.2f}, p50 ratio {result['compensa_p50_to_dbos_p50']:.2f})"
            )


@app.command("telemetry")
@command
async def bench_telemetry(
    inflight: Annotated[int, typer.Option(min=1, help="Concurrent sagas.")] = 10,
    seconds: Annotated[float, typer.Option(min=1.0, help="Measured seconds per run.")] = 15.0,
    rounds: Annotated[int, typer.Option(min=1, help="Off/on pairs, alternated.")] = 2,
    scrape_seconds: Annotated[
        float, typer.Option(min=0.5, help="Seconds between scrapes of each /metrics (the shipped Prometheus: 15).")
    ] = 5.0,
    as_json: JsonOpt = False,
) -> None:
    """CPU per saga with exporters off vs on (OTLP to a local receiver, /metrics scraped), alternated in one run.

    The receiver and the scraper run in processes of their own, as a collector and
    Prometheus would: the CPU figures are compensa's processes and the client placing orders.
    """
    from statistics import median

    from infra.bench.cost import describe
    from infra.bench.saga import PROCESS_LABELS, telemetry_cost
    from infra.logging import configure_logging
    from infra.settings import derive_management_url

    configure_logging("WARNING", "json")
    database_url, amqp_url = environment_urls()
    management_url = get_settings().amqp_management_url or derive_management_url(amqp_url)
    report = Report("telemetry", as_json)
    report.say(
        f"telemetry cost: bench saga --processes at {inflight} in flight, {seconds:g} s a run, {rounds} off/on pairs, "
        f"/metrics scraped every {scrape_seconds:g} s when on"
    )
    result = await telemetry_cost(database_url, amqp_url, inflight, seconds, rounds, management_url, scrape_seconds)
    report.data.update(result)
    totals: dict[str, list[float]] = {"off": [], "on": []}
    for run in result["runs"]:
        cost = run["per_saga"]
        totals[run["mode"]].append(cost["cpu_ms_total"])
        rate = f"{run['sagas_per_s']:6.1f} sagas/s  p99 {run['p99_ms']:5.0f} ms"
        report.say(f"  {run['mode']:>3}: {rate}  {describe(cost, ['client', *PROCESS_LABELS])}")
    off, on = median(totals["off"]), median(totals["on"])
    # Each round's on / off, side by side in time: what a noisy neighbour skews, it skews in one round.
    pairs = [b / a for a, b in zip(totals["off"], totals["on"], strict=True) if a]
    # The machine's speed drifts over minutes; within a round it drifts little, so the
    # median of the rounds' ratios is the steadier figure of the two.
    round_median = median(pairs) if pairs else None
    exported = sum(run["completed"] for run in result["runs"] if run["mode"] == "on")
    report.data["cpu_ms_per_saga"] = {
        "off": off,
        "on": on,
        "ratio": on / off if off else None,
        "round_ratios": pairs,
        "median_round_ratio": round_median,
    }
    report.data["otlp_bytes_per_saga"] = result["otlp_bytes"] / exported if exported else None
    report.say("  on / off per round: " + ", ".join(f"{ratio:.3f}" for ratio in pairs))
    report.say(f"OTLP receiver: {result['otlp_requests']} exports, {result['otlp_bytes'] / 1e6:.1f} MB")
    if exported:
        report.figure("OTLP bytes per completed saga (traces and metrics)", result["otlp_bytes"] / exported, "B")
    report.figure("CPU per saga, exporters off (median)", off, "ms")
    report.figure("CPU per saga, exporters on (median)", on, "ms")
    report.say(f"  {'=> on / off (ratio of the medians)':<52} {on / off if off else float('nan'):>12.3f}")
    report.say(f"  {'=> on / off (median of the rounds)':<52} {round_median or float('nan'):>12.3f}")
    report.done()


@app.command("simulate")
def bench_simulate(
    sagas: Annotated[int, typer.Option(min=10)] = 10_000,
    faults: Annotated[str, typer.Option()] = "chaos",
    real_sagas: Annotated[int, typer.Option(min=0, help="Sagas for the real-stack rate in the same run (0: skip).")] = 300,
    swarm_seeds: Annotated[int, typer.Option(min=0, help="Seeds for the swarm rate on every core (0: skip).")] = 8,
    swarm_sagas: Annotated[int, typer.Option(min=10, help="Sagas per swarm seed.")] = 200,
    as_json: JsonOpt = False,
) -> None:
    """Simulated sagas per wall second (one seed, and a swarm on every core), and its ratio to the real stack's."""
    from infra.bench.simulate import real_stack_rate, simulation_rate, swarm_rate
    from infra.logging import configure_logging

    configure_logging("CRITICAL", "json")
    report = Report("simulate", as_json)
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
            report.data["real_stack"] = real
            report.say(
                f"real stack, {real_sagas:,} sagas ({faults}, faults it can inject): "
                f"{real['wall_s']:.1f} s from first order to last saga settled, "
                f"{real['sagas_per_s']:.1f} sagas/s, outcomes {real['outcomes']}, "
                f"invariants {'hold' if real['invariants_ok'] else 'VIOLATED'}"
            )
    result = simulation_rate(sagas, faults)
    report.data["simulated"] = result
    report.say(
        f"simulated {sagas:,} sagas ({faults}): {result['wall_s']:.1f} s wall, {result['sagas_per_s']:.1f} sagas/s, "
        f"outcomes {result['outcomes']}, RSS growth {result['rss_growth_mb']:.0f} MB, "
        f"invariants {'hold' if result['invariants_ok'] else 'VIOLATED'}"
    )
    if real is not None:
        report.data["ratio_simulated_to_real"] = result["sagas_per_s"] / real["sagas_per_s"]
        report.say(f"ratio simulated / real stack: {report.data['ratio_simulated_to_real']:.1f}")
    if swarm_seeds:
        from infra.simulation.swarm import default_workers

        swarm = swarm_rate(swarm_sagas, swarm_seeds, default_workers(), faults)
        report.data["swarm"] = swarm
        report.say(
            f"swarm of {swarm_seeds} seeds x {swarm_sagas:,} sagas ({faults}) on {swarm['workers']} processes: "
            f"{swarm['swarm_wall_s']:.1f} s wall, failed seeds {swarm['failed_seeds'] or 'none'}"
        )
        report.figure("one seed on one core", swarm["one_seed_sagas_per_s"], "sagas/s")
        report.figure(f"swarm on {swarm['workers']} processes", swarm["swarm_sagas_per_s"], "sagas/s")
        report.figure("ratio swarm / one seed", swarm["speedup"], "×")
    report.done()


@app.command("faststream")
@command
async def bench_faststream(
    messages: Annotated[int, typer.Option(min=100, help="Messages per run.")] = 5_000,
    rounds: Annotated[int, typer.Option(min=1, help="Alternated runs of each; the lowest cost counts.")] = 2,
    as_json: JsonOpt = False,
) -> None:
    """CPU per consumed message: FastStream with compensa's decoding vs raw aio-pika (needs RabbitMQ)."""
    try:
        import faststream  # noqa: F401 - only to know whether it can run
    except ImportError:
        fail("bench faststream needs FastStream: pip install 'compensa[faststream]' (or scripts/setup.sh --bench)")
    from infra.bench.faststream import consume_cpu

    _database_url, amqp_url = environment_urls()
    report = Report("faststream", as_json)
    report.say(f"faststream benchmark: {messages:,} compensa events per run, {rounds} alternated round(s), prefetch 100")
    report.data.update(result := await consume_cpu(amqp_url, messages, rounds))
    report.figure("raw aio-pika: decode, check, ack", result["raw_aio_pika_us"], "µs CPU/msg")
    report.figure("FastStream subscriber (producers.sdk.faststream)", result["faststream_us"], "µs CPU/msg")
    report.figure("ratio FastStream / raw", result["ratio"], "×")
    report.done()


@app.command("api")
@command
async def bench_api(
    clients: Annotated[list[int], typer.Option("--clients", help="Concurrent clients (repeatable).")] = [1, 50],  # noqa: B006
    seconds: Annotated[float, typer.Option(min=1.0, help="Seconds per measurement.")] = 10.0,
    workers: Annotated[int, typer.Option(min=1, max=64, help="`compensa api` worker processes.")] = 1,
    as_json: JsonOpt = False,
) -> None:
    """Accepted events/s through the API (with Idempotency-Keys) vs bare outbox inserts; p50/p99.

    Needs PostgreSQL and Redis (COMPENSA_DATABASE_URL, COMPENSA_REDIS_URL); empties the
    ingest outbox before and after, so point it at benchmark servers only.
    """
    from infra.bench.api import api_rate

    settings = get_settings()
    if not settings.database_url.startswith("postgresql") or not settings.redis_url:
        fail("bench api needs COMPENSA_DATABASE_URL=postgresql+asyncpg://… and COMPENSA_REDIS_URL=redis://…")
    report = Report("api", as_json)
    report.say(
        f"api benchmark: {seconds:g} s per level, `compensa api` with {workers} worker(s), "
        "keep-alive HTTP clients in this process; "
        "bare = one INSERT into ingest_outbox per transaction"
    )
    report.data["levels"] = results = await api_rate(settings, sorted(set(clients)), seconds, workers)
    for result in results:
        bare, through = result["bare"], result["api"]
        report.say(
            f"  {result['clients']:>3} clients: api {through['per_s']:8.1f} events/s  p50 {through['p50_ms']:6.1f} ms  "
            f"p99 {through['p99_ms']:6.1f} ms | bare outbox {bare['per_s']:8.1f} inserts/s  p50 {bare['p50_ms']:6.1f} ms  "
            f"p99 {bare['p99_ms']:6.1f} ms | ratio {result['ratio']:.2f}"
        )
    report.done()


@app.command("replay")
@command
async def bench_replay(
    messages: Annotated[int, typer.Option(min=100, help="Dead letters to archive and replay.")] = 10_000,
    batch_size: Annotated[int, typer.Option(min=1, max=10_000, help="Dead letters per replay transaction.")] = 200,
    as_json: JsonOpt = False,
) -> None:
    """Replay N archived dead letters (with the progress bar), then relay them: replayed/s vs relay msgs/s."""
    from infra.bench.dlq import replay_rate

    database_url, amqp_url = environment_urls()
    report = Report("replay", as_json)
    report.say(f"replay benchmark: {messages:,} dead letters, same PostgreSQL and RabbitMQ")
    result = await replay_rate(database_url, amqp_url, messages, batch_size=batch_size, console=err)
    report.data.update(messages=messages, **result, ratio_replay_to_relay=result["replay_per_s"] / result["relay_per_s"])
    for label, key, unit in (
        ("archive (DLQ → dead_letters, acked after commit)", "archive_per_s", "msgs/s"),
        ("replay (validate → dlq outbox + mark replayed)", "replay_per_s", "msgs/s"),
        ("relay of the replayed rows (publish with confirms)", "relay_per_s", "msgs/s"),
    ):
        report.figure(label, result[key], unit)
    report.say(f"  ratio replay / relay: {report.data['ratio_replay_to_relay']:.2f}  (target ≥ 0.5)")
    report.say(f"  delivered to the bench queue: {result['delivered']:,.0f} of {messages:,}")
    report.done()


@app.command("console")
@command
async def bench_console(
    sagas: Annotated[int, typer.Option(min=1_000, max=10_000_000, help="Sagas to seed.")] = 100_000,
    history: Annotated[int, typer.Option(min=1, max=100, help="History rows per saga.")] = 10,
    runs: Annotated[int, typer.Option(min=1, max=100, help="Timed runs per query (after one warm-up).")] = 7,
    as_json: JsonOpt = False,
) -> None:
    """Time each query of the operator console on N seeded sagas (median wall ms).

    Needs PostgreSQL only (COMPENSA_DATABASE_URL): the sagas, their history, dead letters
    and audit rows are seeded in bulk into a scratch database beside it, dropped at the end.
    """
    from infra.bench.console import console_queries

    settings = get_settings()
    if not settings.database_url.startswith("postgresql"):
        fail("bench console needs COMPENSA_DATABASE_URL=postgresql+asyncpg://… (it seeds a scratch database beside it)")
    report = Report("console", as_json)
    report.say(f"console benchmark: {sagas:,} sagas × {history} history rows, median of {runs} runs per query")
    result = await console_queries(settings.database_url, sagas, history, runs)
    report.data.update(sagas=sagas, history_per_saga=history, **result)
    report.say("  seeded " + ", ".join(f"{table} {count:,}" for table, count in result["rows"].items()))
    report.say(f"  in {sum(result['seed_seconds'].values()):.1f} s (INSERT … SELECT generate_series, then VACUUM ANALYZE)")
    for query in result["queries"]:
        report.figure(query["query"], query["median_ms"], "ms")
    slowest = max(result["queries"], key=lambda q: q["median_ms"])
    report.say(f"  slowest: {slowest['query']} ({slowest['median_ms']:.1f} ms median, {slowest['max_ms']:.1f} ms max)")
    report.done()
