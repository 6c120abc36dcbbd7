"""Simulation speed: simulated sagas per wall second, and the same kind of workload on the
real stack, for their ratio."""

from __future__ import annotations

import time
from typing import Any

from infra.bench.common import rss_mb
from infra.db import scratch_database


def _simulation_spec(sagas: int) -> Any:
    from sagas.simulation.workload import WorkloadSpec

    # The default workload: its stock scales with the orders, so most go the whole way
    # (reserve, charge, commit), as `compensa simulate` runs them.
    return WorkloadSpec(sagas=sagas)


def simulation_rate(sagas: int, faults: str = "chaos", seed: int = 1) -> dict[str, Any]:
    """Simulated sagas per wall second (SQLite, in-memory broker, virtual clock)."""
    from infra.simulation.driver import SimulationOptions, run_simulation
    from sagas.simulation.faults import profile

    rss_before = rss_mb()
    started = time.perf_counter()
    result = run_simulation(SimulationOptions(seed=seed, workload=_simulation_spec(sagas), faults=profile(faults)))
    elapsed = time.perf_counter() - started
    return {
        "sagas": sagas,
        "sagas_per_s": sagas / elapsed,
        "wall_s": elapsed,
        "invariants_ok": float(result.ok),
        "rss_growth_mb": rss_mb() - rss_before,
        "outcomes": result.outcomes,
    }


def swarm_rate(sagas: int, seeds: int, workers: int, faults: str = "chaos") -> dict[str, Any]:
    """Simulated sagas per wall second of a swarm on `workers` processes, and of its first seed alone here.

    Every seed runs the same profile and size, so the two rates measure the same work;
    the swarm's wall time includes starting its processes.
    """
    from infra.simulation.swarm import RunSpec, run_one, run_swarm

    specs = [RunSpec(seed=seed, sagas=sagas, faults=faults) for seed in range(1, seeds + 1)]
    alone = run_one(specs[0])
    swarm = run_swarm(specs, workers)
    one_core = alone.sagas / alone.wall_seconds
    all_cores = swarm.sagas / swarm.wall_seconds
    return {
        "sagas_per_seed": sagas,
        "seeds": seeds,
        "workers": workers,
        "one_seed_sagas_per_s": one_core,
        "swarm_sagas_per_s": all_cores,
        "swarm_wall_s": swarm.wall_seconds,
        "speedup": all_cores / one_core,
        "failed_seeds": [o.seed for o in swarm.failures],
    }


async def real_stack_rate(database_url: str, amqp_url: str, sagas: int, faults: str = "chaos", seed: int = 1) -> dict[str, Any]:
    """The same kind of workload end to end on PostgreSQL and RabbitMQ, in wall time.

    A real-stack run checks every row, so it gets a scratch database of its own. The
    broker is shared: a run refuses (RealStackError) when compensa's queues hold
    messages or have consumers, rather than touching them. The rate counts from the
    first order placed to the last saga settled, without setup and checking.
    """
    from infra.simulation.realstack import run_real_stack
    from sagas.simulation.faults import profile

    async with scratch_database(database_url) as scratch_url:
        # Orders arrive faster than this machine completes them; deadlines long enough
        # that the backlog is measured as throughput, not turned into timeouts.
        result = await run_real_stack(
            seed,
            _simulation_spec(sagas),
            amqp_url=amqp_url,
            database_url=scratch_url,
            faults=profile(faults),
            timeout=600,
            saga_deadline_seconds=120.0,
            arrival_scale=0.01,
        )
    run_seconds = result.virtual_seconds  # the real stack's clock: first order to quiet
    return {
        "sagas": sagas,
        "sagas_per_s": sagas / run_seconds,
        "wall_s": run_seconds,
        "invariants_ok": float(result.ok),
        "outcomes": result.outcomes,
    }
