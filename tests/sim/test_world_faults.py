"""The faults the real world has: broker restarts, commits of unknown outcome, clock jumps, bursts."""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, select
from sqlalchemy.exc import OperationalError

from contracts import TransientError
from contracts.routing import DEFAULT_EXCHANGE
from infra import topology as t
from infra.clock import VirtualClock
from infra.pipeline import is_dead_connection
from infra.simulation.faults import FaultInjector, UncertainCommits
from infra.simulation.sqlite_facade import create_direct_sqlite_engine
from infra.simulation.swarm import RunSpec, check_determinism
from infra.transport.memory import MemoryBroker
from outbox.ports import OutgoingMessage
from sagas.simulation.faults import BURST_RATE, FaultRates, differences, profile, swarm_rates
from sagas.simulation.report import terminal_summary, to_document
from tests.sim.support import simulate

#: Each new fault at a rate far above any profile's, and the coverage goal it reaches.
FAULTS = {
    "broker_restart": (FaultRates(broker_restart=0.05), "broker_restarted"),
    "commit_unknown": (FaultRates(commit_unknown=0.3), "commit_outcome_unknown"),
    "clock_jump": (FaultRates(clock_jump=0.03), "clock_jumped"),
    "burst": (FaultRates(burst=0.5, consumer_crash=0.05, broker_restart=0.01), "fault_burst"),
}
ALL_FOUR = FaultRates(broker_restart=0.02, commit_unknown=0.1, clock_jump=0.01, burst=0.2, consumer_crash=0.05)


def _message(number: int) -> OutgoingMessage:
    queue = t.STOCK_COMMANDS.name
    return OutgoingMessage(f"m-{number}", "stock.reserve", "saga-1", DEFAULT_EXCHANGE, queue, b"{}")


# ---------------------------------------------------------------- the broker restarts


def test_a_restart_returns_unacked_deliveries_and_closes_their_channels() -> None:
    async def scenario() -> None:
        clock = VirtualClock()
        broker = MemoryBroker(clock)
        queue = t.STOCK_COMMANDS.name
        await broker.publish_batch([_message(1), _message(2), _message(3)])
        first, second = broker.get(queue), broker.get(queue)
        assert first is not None and second is not None

        assert broker.restart(5.0) == 2
        # Back at the head, in the order they were delivered, flagged redelivered.
        assert [m.message_id for m in broker.queues[queue]] == ["m-1", "m-2", "m-3"]
        assert [m.redelivered for m in broker.queues[queue]] == [True, True, False]
        assert first.channel_closed
        with pytest.raises(TransientError, match="channel closed"):
            await first.ack()
        with pytest.raises(TransientError, match="channel closed"):
            await second.retry(500, 500, {})
        await second.requeue()  # a no-op: the broker has it back already
        assert broker.depth(queue) == 3

        # Away: nothing delivered, nothing confirmed.
        assert not broker.available and broker.get(queue) is None
        with pytest.raises(TransientError, match="not confirmed"):
            await broker.publish_batch([_message(4)])

        clock.advance(5.0)
        assert broker.available
        await broker.publish_batch([_message(4)])
        again = broker.get(queue)
        assert again is not None and again.redelivered and not again.channel_closed
        await again.ack()
        assert (broker.stats.restarts, broker.stats.returned_on_restart, broker.depth(queue)) == (1, 2, 3)

    asyncio.run(scenario())


# ---------------------------------------------------------------- commits of unknown outcome


def test_an_unknown_commit_is_durable_or_not_and_always_reported_as_a_lost_connection(tmp_path: Path) -> None:
    rows = Table("rows", MetaData(), Column("n", Integer, primary_key=True))

    async def scenario() -> tuple[int, int]:
        engine = create_direct_sqlite_engine(str(tmp_path / "unknown.db"))
        async with engine.begin() as connection:
            await connection.run_sync(rows.metadata.create_all)
        faults = FaultInjector(FaultRates(commit_unknown=1.0), random.Random(7))
        uncertain = UncertainCommits(engine, faults)
        for n in range(40):
            connection = await uncertain.connect()
            await connection.begin()
            await connection.execute(rows.insert(), {"n": n})
            with pytest.raises(OperationalError) as lost:
                await connection.commit()
            assert is_dead_connection(lost.value)  # what the pipeline reruns on a new connection
            await connection.close()
        async with engine.connect() as connection:
            durable = len((await connection.execute(select(rows.c.n))).all())
        await engine.dispose()
        return durable, faults.injected["commit_unknown_durable"]

    durable, counted = asyncio.run(scenario())
    assert durable == counted
    assert 0 < durable < 40, "both outcomes drawn"


# ---------------------------------------------------------------- bursts


def test_a_burst_makes_one_kind_strike_often_for_a_while() -> None:
    clock = VirtualClock()
    faults = FaultInjector(FaultRates(consumer_crash=0.001, burst=1.0, burst_seconds=10.0), random.Random(3), clock=clock)
    while not faults.chance("consumer_crash"):
        pass
    assert faults.injected["burst"] == 1
    during = sum(faults.chance("consumer_crash") for _ in range(400))
    assert abs(during / 400 - BURST_RATE) < 0.1
    assert faults.injected["burst"] == 1, "no burst starts inside one"
    clock.advance(10.0)
    misses = 0
    while not faults.chance("consumer_crash"):
        misses += 1
    assert misses > 50, "back at its own rate once the burst is over"
    assert faults.injected["burst"] == 2, "and the next strike starts the next burst"
    # Kinds that do not burst never start one.
    outages = FaultInjector(FaultRates(silence=1.0, burst=1.0), random.Random(3), clock=clock)
    assert outages.chance("silence") and outages.injected["burst"] == 0


# ---------------------------------------------------------------- whole runs


@pytest.mark.parametrize("fault", FAULTS)
def test_the_fault_strikes_and_every_invariant_holds(fault: str) -> None:
    rates, goal = FAULTS[fault]
    for seed in (1, 2, 3):
        result = simulate(seed=seed, sagas=20, faults=rates)

        assert result.violations == [], (seed, result.violations)
        assert sum(result.outcomes.values()) == 20
        assert result.faults_injected[fault] > 0, seed
        assert result.coverage[goal] > 0, seed
        if fault == "commit_unknown":
            # Both outcomes: some commits were durable after all, some were not.
            assert 0 < result.faults_injected["commit_unknown_durable"] < result.faults_injected["commit_unknown"]
        if fault == "broker_restart":
            assert result.counters["broker_restarts"] == result.faults_injected["broker_restart"]
            assert "broker:          restarted" in terminal_summary(to_document(result))


def test_a_clock_jump_makes_deadlines_fire_on_work_in_flight() -> None:
    calm = simulate(seed=1, sagas=20)
    jumpy = simulate(seed=1, sagas=20, faults=FaultRates(clock_jump=0.03, clock_jump_seconds=90.0))

    assert jumpy.ok, jumpy.violations
    assert jumpy.coverage["deadline_mid_step"] > calm.coverage["deadline_mid_step"]
    assert jumpy.outcomes.get("cancelled", 0) > calm.outcomes.get("cancelled", 0)


def test_the_new_faults_replay_identically() -> None:
    found = check_determinism(RunSpec(seed=4, sagas=20, faults="none", overrides=tuple(sorted(differences(ALL_FOUR).items()))))

    assert found.ok, found.as_dict()
    assert found.events[0] == found.events[1] > 200


def test_the_product_is_live_once_the_new_faults_stop() -> None:
    result = simulate(seed=5, sagas=30, faults=ALL_FOUR, liveness=True)

    assert result.ok, result.violations
    for fault in ("broker_restart", "commit_unknown", "burst"):
        assert result.faults_injected[fault] > 0, fault


def test_profiles_and_the_swarm_draw_the_new_faults() -> None:
    chaos = profile("chaos")
    assert min(chaos.broker_restart, chaos.commit_unknown, chaos.clock_jump, chaos.burst) > 0
    drawn = [differences(swarm_rates(seed)) for seed in range(1, 21)]
    for fault in ("broker_restart", "commit_unknown", "clock_jump", "burst"):
        assert 0 < sum(fault in seed for seed in drawn) < 20, fault
    assert all("broker_restart_seconds" in seed for seed in drawn if "broker_restart" in seed)
    assert all("clock_jump_seconds" in seed for seed in drawn if "clock_jump" in seed)


def test_a_restart_window_is_seeded_virtual_time() -> None:
    result = simulate(seed=2, sagas=20, faults=FaultRates(broker_restart=0.05, broker_restart_seconds=30.0), trace=True)

    restarts = [event for event in result.trace if event[1] == "broker_restart"]
    assert restarts
    for at, *_ in restarts:
        # No delivery while the broker is away.
        assert not [e for e in result.trace if e[1] == "deliver" and at < e[0] < at + 30.0]
    assert timedelta(seconds=result.virtual_seconds) > timedelta(seconds=30.0)
