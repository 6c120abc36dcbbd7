"""The simulator's workload on the real stack: PostgreSQL, RabbitMQ and real time.

A small seeded run with duplicate publishes and relay crashes after confirm must end
with every saga terminal, the work queues empty and every invariant holding.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from infra.db import scratch_database
from infra.simulation.realstack import (
    RUN_QUEUES,
    RealStackError,
    real_stack_faults,
    real_stack_transport,
    run_real_stack,
)
from sagas.simulation.faults import FaultRates, profile
from sagas.simulation.report import terminal_summary, to_document
from sagas.simulation.workload import WorkloadSpec

SAGAS = 10


@pytest.fixture
async def fresh_database(database_url: str) -> AsyncIterator[Callable[[], Awaitable[str]]]:
    """``await fresh_database()`` creates an empty database; all are dropped afterwards."""
    async with AsyncExitStack() as databases:

        async def create() -> str:
            return await databases.enter_async_context(scratch_database(database_url, "realstack"))

        yield create


@pytest.fixture
async def idle_queues(amqp_url: str) -> None:
    """The run's work and delay queues, declared and empty (other tests share the broker)."""
    transport = real_stack_transport(amqp_url)
    await transport.declare_topology()
    try:
        channel = await transport.connection.channel()
        for name in RUN_QUEUES:
            await (await channel.declare_queue(name, passive=True)).purge()
        await channel.close()
    finally:
        await transport.close()


@pytest.mark.integration
async def test_real_stack_smoke_with_duplicates_relay_crashes_and_transient_errors(
    fresh_database: Callable[[], Awaitable[str]], amqp_url: str, idle_queues: None
) -> None:
    database_url = await fresh_database()
    faults = FaultRates(duplicate=0.2, relay_crash=0.2, transient_error=0.2)

    result = await run_real_stack(
        1, WorkloadSpec(sagas=SAGAS), amqp_url=amqp_url, database_url=database_url, faults=faults, timeout=90
    )

    document = to_document(result)
    summary = terminal_summary(document)
    assert result.ok, summary
    assert sum(result.outcomes.values()) == SAGAS, summary
    assert set(result.outcomes) <= {"completed", "cancelled", "rejected"}
    assert result.faults_injected["duplicate"] > 0 and result.faults_injected["relay_crash"] > 0
    # Injected into the participants' handlers behind the batching consumer, and retried.
    assert result.faults_injected["transient_error"] > 0 and result.counters["retried"] > 0
    assert result.counters["duplicates_skipped"] > 0
    assert document["stack"] == "real"
    assert document["stack_details"]["quiet_before_timeout"] is True
    assert document["stack_details"]["messages_left_in_queues"] == {}
    assert "on the real stack" in summary

    # The same database again: the run refuses rather than mixing two runs' rows.
    with pytest.raises(RealStackError, match="already holds 10 orders"):
        await run_real_stack(1, WorkloadSpec(sagas=SAGAS), amqp_url=amqp_url, database_url=database_url)


def test_real_stack_keeps_only_the_faults_it_can_inject() -> None:
    kept, ignored = real_stack_faults(profile("chaos"))

    assert kept.duplicate == profile("chaos").duplicate
    assert kept.relay_crash == profile("chaos").relay_crash
    assert kept.transient_error == profile("chaos").transient_error
    assert kept.reorder == kept.lost_ack == kept.silence == kept.gateway_outage == 0
    assert set(ignored) == {
        "lost_ack",
        "reorder",
        "delay",
        "consumer_crash",
        "permanent_error",
        "silence",
        "gateway_outage",
        "broker_restart",
        "commit_unknown",
        "clock_jump",
        "burst",
    }


@pytest.mark.integration
async def test_cli_runs_the_workload_on_the_real_stack(
    fresh_database: Callable[[], Awaitable[str]], amqp_url: str, idle_queues: None
) -> None:
    database_url = await fresh_database()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPENSA_")} | {"COLUMNS": "200"}
    compensa = str(Path(sys.executable).with_name("compensa"))

    run = await asyncio.to_thread(  # the subprocess runs while this loop stays free
        subprocess.run,
        [
            compensa,
            "simulate",
            "-n",
            "5",
            "--seed",
            "2",
            "--faults",
            "default",
            "--fault",
            "transient_error=0.2",
            "--amqp-url",
            amqp_url,
            "--database-url",
            database_url,
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )

    assert run.returncode == 0, run.stderr + run.stdout
    document = json.loads(run.stdout)
    assert document["stack"] == "real"
    assert sum(document["outcomes"].values()) == 5
    assert document["invariants"]["ok"] is True
    assert document["faults"]["reorder"] == 0 and document["faults"]["transient_error"] == 0.2
    assert "ignoring lost_ack, reorder, delay, consumer_crash, silence" in " ".join(run.stderr.split())
