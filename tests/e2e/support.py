"""Helpers for end-to-end saga tests: the module's stack, placing orders, reading outcomes.

- ``Stack``: the module's database and broker, settings and `compensa` environments for
  them, queue depths; ``FAST`` timings; ``METRICS`` for the terminal summary;
- ``Process``: a `compensa run` OS process a test started, with its log;
- orders: ``unique``, ``planned``, ``workload``, ``place``, ``place_all``;
- outcomes: ``saga_statuses``, ``saga_row``, ``saga_triggers``, ``wait_terminal``,
  ``ledger_kinds``, ``messages_left``, ``assert_sound`` (every invariant holds);
- ``DoubledReordered``: a transport whose publishes arrive twice and out of order.

The fixtures that build these (``stack``, ``services``, ``processes``) are in conftest.py.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from consumers.ledger import ledger_transactions
from consumers.orders import place_order
from contracts import OrderLine
from infra import topology as t
from infra.clock import SystemClock
from infra.runtime import Runtime
from infra.settings import Settings
from infra.simulation.readback import read_snapshot
from outbox.ports import OutgoingMessage
from sagas.simulation.invariants import TERMINAL_STATUSES, Snapshot, Violation, check
from sagas.simulation.workload import PlannedOrder, Workload, WorkloadSpec
from sagas.tables import saga_history, saga_instances
from tests.support import eventually

#: Short timings so a saga, a retry or a deadline takes well under a second or two.
FAST: dict[str, Any] = {
    "max_attempts": 5,
    "retry_base_seconds": 0.05,
    "retry_max_seconds": 1.0,
    "relay_poll_seconds": 0.05,
    "deadline_sweep_seconds": 0.1,
    "saga_step_deadline_seconds": 5.0,
    "saga_compensation_deadline_seconds": 2.0,
    "shutdown_grace_seconds": 10.0,
    "log_level": "WARNING",
}

#: Metrics tests record for the terminal summary (e.g. the load test's sagas/s).
METRICS: dict[str, str] = {}


@dataclass
class Stack:
    """The module's database and broker, and settings pointing at them."""

    database_url: str
    amqp_url: str
    engine: AsyncEngine
    channel: aio_pika.abc.AbstractChannel
    overrides: dict[str, Any] = field(default_factory=dict)

    def settings(self, **overrides: Any) -> Settings:
        """Settings for in-process services: FAST timings, then `overrides`."""
        return Settings(database_url=self.database_url, amqp_url=self.amqp_url, **{**FAST, **overrides})

    def env(self, **overrides: Any) -> dict[str, str]:
        """The environment for a `compensa` process with the same settings."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("COMPENSA_")}
        env["COMPENSA_DATABASE_URL"] = self.database_url
        env["COMPENSA_AMQP_URL"] = self.amqp_url
        for name, value in {**FAST, **overrides}.items():
            env[f"COMPENSA_{name.upper()}"] = str(value)
        return env

    async def queue_depth(self, name: str) -> int:
        """Ready messages in a queue, as the broker counts them."""
        queue = await self.channel.declare_queue(name, passive=True)
        return queue.declaration_result.message_count

    async def consumer_count(self, name: str) -> int:
        queue = await self.channel.declare_queue(name, passive=True)
        return queue.declaration_result.consumer_count


def retry_delays(settings: Settings) -> list[int]:
    return t.retry_delays_ms(settings.max_attempts, settings.retry_base_seconds, settings.retry_max_seconds)


def all_queue_names(settings: Settings) -> list[str]:
    """Delay queues first (they feed their work queue), then work queues and DLQs."""
    names = [q.delay_queue(ms) for q in t.WORK_QUEUES for ms in retry_delays(settings)]
    names += [q.name for q in t.WORK_QUEUES] + [q.dlq for q in t.WORK_QUEUES]
    return names


StartServices = Callable[..., Awaitable[Runtime]]


@dataclass
class Process:
    """A `compensa` OS process this test started, with its log file."""

    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


CURRENCY = "EUR"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def planned(lines: Sequence[tuple[str, int, int]], *, token: str = "tok_ok", order_id: str | None = None) -> PlannedOrder:
    """An order of (sku, quantity, unit price) lines, paid with `token`."""
    return PlannedOrder(
        order_id=order_id or unique("ord"),
        at_seconds=0.0,
        customer_id=unique("cust"),
        lines=tuple(OrderLine(sku=sku, quantity=q, unit_price=p) for sku, q, p in lines),
        payment_token=token,
    )


def workload(stock: dict[str, int], orders: Iterable[PlannedOrder]) -> Workload:
    orders = tuple(orders)
    return Workload(spec=WorkloadSpec(sagas=len(orders)), stock=dict(stock), orders=orders)


async def place(engine: AsyncEngine, order: PlannedOrder) -> str:
    return await place_order(
        engine,
        SystemClock(),
        order_id=order.order_id,
        customer_id=order.customer_id,
        lines=order.lines,
        currency=CURRENCY,
        payment_token=order.payment_token,
    )


async def place_all(engine: AsyncEngine, orders: Iterable[PlannedOrder], concurrency: int = 10) -> None:
    """Place the orders concurrently, at most `concurrency` placements at once."""
    gate = asyncio.Semaphore(concurrency)

    async def one(order: PlannedOrder) -> None:
        async with gate:
            await place(engine, order)

    await asyncio.gather(*(one(o) for o in orders))


async def saga_statuses(engine: AsyncEngine, ids: Iterable[str]) -> dict[str, str]:
    ids = list(ids)
    async with engine.connect() as c:
        rows = (
            await c.execute(select(saga_instances.c.saga_id, saga_instances.c.status).where(saga_instances.c.saga_id.in_(ids)))
        ).all()
    return dict(rows)  # type: ignore[arg-type]


async def saga_row(engine: AsyncEngine, saga_id: str):  # type: ignore[no-untyped-def]
    async with engine.connect() as c:
        return (await c.execute(select(saga_instances).where(saga_instances.c.saga_id == saga_id))).one_or_none()


async def saga_triggers(engine: AsyncEngine, saga_id: str) -> list[str]:
    async with engine.connect() as c:
        query = select(saga_history.c.trigger).where(saga_history.c.saga_id == saga_id).order_by(saga_history.c.version)
        return list((await c.execute(query)).scalars())


async def wait_terminal(engine: AsyncEngine, ids: Iterable[str], timeout: float = 20.0) -> dict[str, str]:
    """Wait until every saga has ended; return each one's status."""
    ids = list(ids)

    async def done() -> dict[str, str] | None:
        statuses = await saga_statuses(engine, ids)
        open_ = {i: statuses.get(i) for i in ids if statuses.get(i) not in TERMINAL_STATUSES}
        assert not open_, f"{len(open_)} of {len(ids)} sagas not terminal, e.g. {dict(list(open_.items())[:5])}"
        return statuses

    return await eventually(done, timeout=timeout, interval=0.05, message="sagas did not all end")


async def ledger_kinds(stack: Stack, order_id: str) -> list[str]:
    """The kinds of ledger transaction posted for an order (capture, refund), sorted."""
    async with stack.engine.connect() as c:
        query = select(ledger_transactions.c.kind).where(ledger_transactions.c.order_id == order_id)
        return sorted((await c.execute(query)).scalars())


async def messages_left(stack: Stack) -> dict[str, int]:
    """Ready messages per non-empty compensa queue (work, delay and dead-letter)."""
    depths = {name: await stack.queue_depth(name) for name in all_queue_names(stack.settings())}
    return {name: n for name, n in depths.items() if n}


async def assert_sound(stack: Stack, load: Workload, timeout: float = 20.0) -> Snapshot:
    """Wait until the run settles with no invariant violated; fail listing the violations.

    The services are eventually consistent (the ledger follows payments, orders follow
    the saga), so the invariants are polled until they hold or `timeout` passes.
    """

    async def sound() -> Snapshot:
        left = await messages_left(stack)
        snapshot = await read_snapshot(stack.engine, load, messages_left=sum(left.values()))
        violations: list[Violation] = check(snapshot)
        dead = {name: n for name, n in left.items() if name.endswith(".dlq")}
        problems = [f"{v.invariant} [{v.saga_id}]: {v.detail}" for v in violations]
        if left:
            problems.append(f"messages left in queues: {left}")
        if dead:
            problems.append(f"dead letters: {dead}")
        assert not problems, "\n  " + "\n  ".join(problems[:30])
        return snapshot

    return await eventually(sound, timeout=timeout, interval=0.25, message="invariants did not hold")


class DoubledReordered:
    """A transport whose publishes arrive twice and out of order.

    Each batch the relay publishes goes out reversed, then again in order: every
    message is delivered twice (same message id), and the replies within a batch
    reach their consumers in the opposite order to the one they were committed in.
    """

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self.inner = inner
        self.published = 0

    async def publish_batch(self, messages: Sequence[OutgoingMessage]) -> None:
        await self.inner.publish_batch(list(reversed(messages)))
        await self.inner.publish_batch(list(messages))
        self.published += 2 * len(messages)

    async def declare_topology(self) -> None:
        await self.inner.declare_topology()

    async def consume(self, queue: t.QueueSpec, handler, prefetch: int):  # type: ignore[no-untyped-def]
        return await self.inner.consume(queue, handler, prefetch)

    async def close(self) -> None:
        await self.inner.close()
