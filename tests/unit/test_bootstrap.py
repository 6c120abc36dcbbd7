"""The composition root, the runtime built on it, and the one fault injector."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from contracts import BusinessRuleError, TransientError
from contracts.messages import ReserveStock, StockLine
from infra import topology as t
from infra.bootstrap import MESSAGE_SERVICES, OUTBOX_SERVICES, RUNNABLE_SERVICES, bootstrap, outboxes_of
from infra.clock import SystemClock
from infra.db import create_engine
from infra.pipeline import Handler
from infra.runtime import Runtime
from infra.settings import Settings
from infra.simulation.faults import FAULTY_SERVICES, FaultInjector, RelayCrash
from infra.transport.memory import MemoryBroker
from outbox.ports import OutgoingMessage, Publisher
from outbox.tables import metadata
from outbox.uow import UnitOfWork
from sagas.simulation.faults import FaultRates
from tests.support import eventually

ROOT = Path(__file__).resolve().parents[2]


def settings(**values: Any) -> Settings:
    """Settings from these values and the defaults, never from the environment."""
    return Settings.model_construct(**values)


def test_bootstrap_builds_every_service_from_the_settings_it_is_given() -> None:
    registry = bootstrap(settings(consumer_batch_size=7, consumer_workers=3, saga_max_in_flight=9, max_attempts=4))

    assert tuple(registry.services) == MESSAGE_SERVICES == ("saga", "stock", "payments", "ledger", "orders")
    assert (*MESSAGE_SERVICES, "dlq") == RUNNABLE_SERVICES
    saga = registry.services["saga"]
    assert (saga.queue, saga.starts, saga.max_in_flight) == (t.SAGA_EVENTS, t.SAGA_STARTS, 9)
    assert {name: s.workers for name, s in registry.services.items()} == {
        "saga": 3,
        "stock": 1,
        "payments": 3,
        "ledger": 1,
        "orders": 3,
    }
    assert all(s.batch_size == 7 for s in registry.services.values())
    assert all(s.starts is None for name, s in registry.services.items() if name != "saga")
    assert set(registry.services["saga"].handlers) == set(t.SAGA_EVENTS.routing_keys) | set(t.SAGA_STARTS.routing_keys)
    assert registry.retry.max_attempts == 4


def test_outboxes_of_a_process() -> None:
    assert outboxes_of(MESSAGE_SERVICES) == OUTBOX_SERVICES  # all of them: ingest and dlq too
    assert outboxes_of(["stock", "dlq"]) == ("stock", "dlq")
    assert outboxes_of([]) == ()


def test_hooks_decide_what_the_registry_hands_out() -> None:
    seen: list[str] = []

    async def refuse(uow: UnitOfWork, message: Any) -> None:
        raise BusinessRuleError("wrapped")

    def wrap_handlers(service: str, handlers: Mapping[str, Handler]) -> Mapping[str, Handler]:
        seen.append(service)
        return dict.fromkeys(handlers, refuse) if service == "payments" else handlers

    class Wrapped:
        def __init__(self, inner: Publisher) -> None:
            self.inner = inner

        async def publish_batch(self, messages: Sequence[OutgoingMessage]) -> None:
            await self.inner.publish_batch(messages)

    registry = bootstrap(settings(), wrap_handlers=wrap_handlers, wrap_publisher=Wrapped)
    broker = MemoryBroker(SystemClock())

    assert seen == list(MESSAGE_SERVICES)
    assert set(registry.services["payments"].handlers.values()) == {refuse}
    assert refuse not in registry.services["stock"].handlers.values()
    publisher = registry.publisher(broker)
    assert isinstance(publisher, Wrapped) and publisher.inner is broker
    assert bootstrap(settings()).publisher(broker) is broker


def test_importing_the_composition_root_reads_no_environment() -> None:
    """A bad COMPENSA_* value used to crash `simulate` at import (SERVICES = build_services(Settings()))."""
    env = os.environ | {"COMPENSA_PAYMENT_AMOUNT_LIMIT": "not a number", "COMPENSA_PREFETCH": "-1"}
    code = (
        "import infra.bootstrap, infra.runtime, infra.health\n"
        "from infra.simulation.driver import SimulationOptions, run_simulation\n"
        "from sagas.simulation.workload import WorkloadSpec\n"
        "print(run_simulation(SimulationOptions(seed=3, workload=WorkloadSpec(sagas=3))).ok)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )

    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "True"  # after the run's log lines


# ---------------------------------------------------------------- the runtime


class CountingBroker(MemoryBroker):
    declared = 0

    async def declare_topology(self) -> None:
        self.declared += 1
        await super().declare_topology()


@pytest.fixture
async def engine(tmp_path: Path):  # type: ignore[no-untyped-def]
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'runtime.db'}")
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    yield engine
    await engine.dispose()


async def test_a_relay_process_is_a_runtime_without_consumers(engine) -> None:  # type: ignore[no-untyped-def]
    clock = SystemClock()
    broker = CountingBroker(clock)
    async with UnitOfWork(engine, "orders", clock) as uow:
        uow.send(ReserveStock(order_id="o-1", lines=[StockLine(sku="A", quantity=1)]), correlation_id="o-1")
        await uow.commit()
    published: list[str] = []

    class Noting:
        def __init__(self, inner: Publisher) -> None:
            self.inner = inner

        async def publish_batch(self, messages: Sequence[OutgoingMessage]) -> None:
            await self.inner.publish_batch(messages)
            published.extend(m.type for m in messages)

    runtime = Runtime(
        engine,
        broker,
        clock,
        settings(relay_poll_seconds=0.05, shutdown_grace_seconds=2.0),
        outboxes=["orders"],
        registry=bootstrap(settings(), wrap_publisher=Noting),
    )
    await runtime.start()
    try:
        await eventually(lambda: broker.depth(t.STOCK_COMMANDS.name) == 1, timeout=5)
    finally:
        await runtime.stop()

    assert published == ["stock.reserve"]  # through the registry's (wrapped) publisher
    assert [r.service for r in runtime.relay_objects] == ["orders"]
    assert runtime.processors == {} and runtime.gate is None
    assert broker.declared == 0  # a relay alone declares nothing, as `compensa relay` always did


def test_a_runtime_relays_what_its_consumers_own_unless_told_otherwise() -> None:
    broker = MemoryBroker(SystemClock())
    make = lambda *consumers, **options: Runtime(None, broker, SystemClock(), settings(), consumers, **options)  # type: ignore[arg-type]  # noqa: E731

    assert make(*MESSAGE_SERVICES).outboxes == OUTBOX_SERVICES
    assert make("stock").outboxes == ("stock",)
    assert make("stock", relays=False).outboxes == ()
    assert make(outboxes=["ingest"]).outboxes == ["ingest"]


# ---------------------------------------------------------------- the fault injector


def message(n: int) -> OutgoingMessage:
    return OutgoingMessage(str(n), "stock.reserve", f"o-{n}", "compensa.commands", "stock.reserve", b"{}")


class Collect:
    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    async def publish_batch(self, messages: Sequence[OutgoingMessage]) -> None:
        self.batches.append([m.message_id for m in messages])


def test_a_fault_at_rate_zero_draws_nothing() -> None:
    rng = random.Random(5)
    injector = FaultInjector(FaultRates(), rng)
    state = rng.getstate()

    assert not any(injector.chance(name) for name in ("duplicate", "relay_crash", "transient_error"))
    assert rng.getstate() == state and not injector.injected


async def test_the_publisher_wrapper_duplicates_only_when_told_and_crashes_after_publishing() -> None:
    every = FaultRates(duplicate=1.0, relay_crash=1.0)
    for duplicate_publishes, expected in ((False, ["1", "2"]), (True, ["1", "1", "2", "2"])):
        inner = Collect()
        injector = FaultInjector(every, random.Random(1), duplicate_publishes=duplicate_publishes)

        with pytest.raises(RelayCrash):
            await injector.publisher(inner).publish_batch([message(1), message(2)])

        assert inner.batches == [expected]  # published, then the relay "died" before marking
        assert injector.injected["relay_crash"] == 1


async def test_the_handler_wrapper_breaks_participants_only() -> None:
    calls: list[str] = []

    async def handle(uow: Any, message: Any) -> None:
        calls.append("handled")

    transient = FaultInjector(FaultRates(transient_error=1.0), random.Random(1))
    permanent = FaultInjector(FaultRates(permanent_error=1.0), random.Random(1))

    assert set(FAULTY_SERVICES) == {"stock", "payments"}
    with pytest.raises(TransientError):
        await transient.wrap_handlers("stock", {"stock.reserve": handle})["stock.reserve"](None, None)  # type: ignore[arg-type]
    with pytest.raises(BusinessRuleError):
        await permanent.wrap_handlers("payments", {"payment.charge": handle})["payment.charge"](None, None)  # type: ignore[arg-type]
    assert transient.wrap_handlers("saga", {"x": handle}) == {"x": handle}
    assert calls == []
