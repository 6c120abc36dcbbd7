"""A tiny run of every real-server benchmark, so the benchmark code cannot rot.

These assert that the benchmarks run and count what they should, never how fast.
"""

from __future__ import annotations

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from infra.bench.limits import raw_broker_rate, raw_pipelined_rate
from infra.bench.relay import outbox_rate, relay_memory
from infra.bench.saga import saga_rate, telemetry_cost
from infra.bench.simulate import real_stack_rate
from infra.db import scratch_database
from tests.harness.servers import Servers

pytestmark = pytest.mark.integration


def url_of(engine: AsyncEngine) -> str:
    return engine.url.render_as_string(hide_password=False)


async def test_relay_benchmarks_move_every_message(pg_engine: AsyncEngine, amqp_url: str) -> None:
    raw = await raw_broker_rate(amqp_url, 200)
    assert raw["publish_confirm_per_s"] > 0 and raw["consume_ack_per_s"] > 0
    assert await raw_pipelined_rate(amqp_url, 200) > 0
    for batch in (1, 50):
        for dispatch in (False, True):
            outbox = await outbox_rate(url_of(pg_engine), amqp_url, 300, writers=5, batch=batch, dispatch=dispatch)
            assert outbox["end_to_end_per_s"] > 0
    relayed = await outbox_rate(url_of(pg_engine), amqp_url, 300, precommitted=True)
    assert relayed["end_to_end_per_s"] > 0
    memory = await relay_memory(url_of(pg_engine), amqp_url, 1_000)
    assert memory["messages"] == 1_000 and memory["rss_max_mb"] > 0


async def test_saga_benchmark_completes_sagas_in_process_and_counts_their_cost(
    pg_engine: AsyncEngine, amqp_url: str, servers: Servers
) -> None:
    result = await saga_rate(url_of(pg_engine), amqp_url, inflight=2, seconds=2.0, management_url=servers.amqp_management_url)
    assert result["completed"] >= 2 and result["p50_ms"] > 0
    cost = result["per_saga"]
    assert cost["cpu_ms"]["compensa"] > 0 and cost["cpu_ms_total"] == cost["cpu_ms"]["compensa"]
    # The harness preloads pg_stat_statements: every saga commits several transactions.
    assert cost["transactions"] is not None and cost["transactions"] >= 5
    assert cost["statements"] is not None and cost["statements"] > cost["transactions"]
    # Nine messages per completed saga at least (the broker's counters cover the window).
    assert cost["publishes"] is not None and cost["publishes"] >= 5
    assert cost["deliveries"] is not None and cost["deliveries"] >= 5


async def test_telemetry_benchmark_runs_off_and_on_and_the_exporters_carry_data(
    pg_engine: AsyncEngine, amqp_url: str, servers: Servers
) -> None:
    result = await telemetry_cost(url_of(pg_engine), amqp_url, 2, 2.0, 1, servers.amqp_management_url, scrape_seconds=0.5)
    off, on = result["runs"]
    assert (off["mode"], on["mode"]) == ("off", "on")
    assert off["completed"] >= 2 and on["completed"] >= 2
    assert on["per_saga"]["cpu_ms"]["relay"] > 0
    # On: spans and metrics reached the receiver, and every process answered its scrapes.
    assert result["otlp_requests"] > 0 and result["otlp_bytes"] > 0
    assert on["scrapes"]["scrapes"] >= 3 and on["scrapes"]["failed"] == 0
    assert off["scrapes"]["scrapes"] == 0


async def test_dbos_peer_runs_the_saga_on_a_scratch_database(pg_engine: AsyncEngine) -> None:
    from infra.bench.peer_dbos import dbos_saga_rate

    async with scratch_database(url_of(pg_engine)) as scratch_url:
        [result] = await dbos_saga_rate(scratch_url, [2], 2.0)
    assert result["inflight"] == 2 and result["completed"] >= 2 and result["p50_ms"] > 0


async def test_real_stack_rate_runs_the_workload_with_every_invariant(pg_engine: AsyncEngine, amqp_url: str) -> None:
    result = await real_stack_rate(url_of(pg_engine), amqp_url, 8)
    assert result["sagas"] == 8 and result["invariants_ok"] == 1.0
    assert sum(result["outcomes"].values()) == 8
