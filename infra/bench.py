"""Benchmarks, measured side by side in one run and reported as figures and ratios.

Never timed tests: these print what this machine does today. Every figure in one
report comes from the same servers within minutes of each other, so the ratios
mean more than the absolute numbers on a shared, noisy machine.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

import aio_pika
from sqlalchemy import text

from contracts import new_message
from contracts.messages import LedgerUpdated, OrderLine, Posting
from infra import topology as t
from infra.clock import SystemClock
from infra.db import create_engine, scratch_database
from infra.pipeline import BatchingConsumer, MessageProcessor
from infra.schema import upgrade
from infra.settings import Settings
from infra.transport.rabbit import RabbitTransport
from outbox.relay import Relay
from outbox.uow import UnitOfWork

BENCH_QUEUE = t.QueueSpec("bench.outbox", "ledger", t.EVENTS, (LedgerUpdated.message_type,))
Report = Callable[[str], None]


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _ledger_event(n: int) -> LedgerUpdated:
    return LedgerUpdated(
        order_id=f"bench-{n}",
        transaction_id=f"capture:bench-{n}",
        postings=(Posting(account="cash:EUR", debit=100, credit=0), Posting(account="sales:EUR", debit=0, credit=100)),
        balances={"cash:EUR": 100},
    )


async def _purge(channel: aio_pika.abc.AbstractChannel, name: str) -> None:
    queue = await channel.declare_queue(name, durable=True, passive=True)
    await queue.purge()


# ---------------------------------------------------------------- broker limits


async def _raw_run(amqp_url: str, messages: int, inflight: int, *, pipelined: bool) -> dict[str, float]:
    """Publish persistent messages with confirms (`inflight` at once) to a fresh queue and
    consume them with acks, either after publishing (`pipelined=False`) or meanwhile."""
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        publish_channel = await connection.channel(publisher_confirms=True)
        consume_channel = await connection.channel()
        await consume_channel.set_qos(prefetch_count=inflight)
        queue = await consume_channel.declare_queue(f"bench.raw.{uuid.uuid4().hex[:8]}", durable=True)
        body = new_message(_ledger_event(0), correlation_id="bench", producer="bench").envelope.model_dump_json().encode()
        received = 0
        done = asyncio.Event()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal received
            await message.ack()
            received += 1
            if received >= messages:
                done.set()

        semaphore = asyncio.Semaphore(inflight)

        async def publish(n: int) -> None:
            async with semaphore:
                await publish_channel.default_exchange.publish(
                    aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=str(n)),
                    routing_key=queue.name,
                )

        tag = await queue.consume(on_message) if pipelined else None
        started = time.perf_counter()
        await asyncio.gather(*(publish(n) for n in range(messages)))
        published = time.perf_counter() - started
        consume_started = time.perf_counter()
        if tag is None:
            tag = await queue.consume(on_message)
        await asyncio.wait_for(done.wait(), timeout=600)
        finished = time.perf_counter()
        await queue.cancel(tag)
        await queue.delete(if_unused=False, if_empty=False)
        return {
            "publish_confirm_per_s": messages / published,
            "consume_ack_per_s": messages / (finished - consume_started),
            "end_to_end_per_s": messages / (finished - started),
        }
    finally:
        await connection.close()


async def raw_broker_rate(amqp_url: str, messages: int, inflight: int = 100) -> dict[str, float]:
    """Persistent publish-with-confirm, then consume-with-ack of the same messages, apart."""
    return await _raw_run(amqp_url, messages, inflight, pipelined=False)


async def raw_pipelined_rate(amqp_url: str, messages: int, inflight: int = 100) -> float:
    """Publish-with-confirm and consume at the same time: the raw path the outbox is compared to."""
    return (await _raw_run(amqp_url, messages, inflight, pipelined=True))["end_to_end_per_s"]


# ---------------------------------------------------------------- outbox path


async def outbox_rate(
    database_url: str, amqp_url: str, messages: int, writers: int = 20, prefetch: int = 100, batch: int = 50,
    precommitted: bool = False,
) -> dict[str, float]:
    """Commit to the outbox → relay → consume with the inbox, all running at once.

    With `precommitted`, the rows are committed in bulk first and only relay →
    consume is timed: the pipeline without the producers' own commits.
    """
    engine = create_engine(database_url, pool_size=writers + 10)
    transport = RabbitTransport(amqp_url)
    await transport.connect()
    clock = SystemClock()
    try:
        await upgrade(engine)
        await _declare_bench_queue(transport)
        async with engine.begin() as c:
            await c.execute(text("TRUNCATE ledger_outbox, ledger_inbox"))
        done = asyncio.Event()
        processed = 0

        async def handle(_uow: UnitOfWork, _message: Any) -> None:
            nonlocal processed
            processed += 1
            if processed >= messages:
                done.set()

        processor = MessageProcessor(engine, "ledger", BENCH_QUEUE.name, {LedgerUpdated.message_type: handle}, clock)
        batching = BatchingConsumer(processor, max_batch=batch, workers=4)
        subscription = await transport.consume(BENCH_QUEUE, processor if batch <= 1 else batching, prefetch)
        stop = asyncio.Event()
        relay = Relay(engine, "ledger", transport, clock, batch_size=200, poll_seconds=0.05)
        from outbox.notify import listen_for_outbox

        relay_task = asyncio.create_task(relay.run(stop))
        listen_task = asyncio.create_task(listen_for_outbox(engine, {"ledger": relay}, stop))
        if precommitted:
            await _precommit(engine, messages, clock)
        counter = iter(range(0 if precommitted else messages))

        async def writer() -> None:
            for n in counter:
                async with UnitOfWork(engine, "ledger", clock) as uow:
                    uow.send(_ledger_event(n), correlation_id=f"bench-{n % 500}")
                    await uow.commit()

        started = time.perf_counter()
        await asyncio.gather(*(writer() for _ in range(writers)))
        committed = time.perf_counter() - started
        await asyncio.wait_for(done.wait(), timeout=600)
        elapsed = time.perf_counter() - started
        stop.set()
        await asyncio.gather(relay_task, listen_task)
        await subscription.stop(5)
        batching.close()
        return {"end_to_end_per_s": messages / elapsed, "outbox_commit_per_s": messages / committed if committed and not precommitted else 0.0}
    finally:
        await transport.close()
        await engine.dispose()


async def _precommit(engine: Any, messages: int, clock: SystemClock) -> None:
    """Commit `messages` outbox rows in bulk, as if many business transactions had run."""
    from outbox.tables import tables_for
    from outbox.uow import outbox_row

    chunk = 5_000
    for start in range(0, messages, chunk):
        rows = [
            outbox_row(new_message(_ledger_event(n), correlation_id=f"bench-{n % 500}", producer="bench"), clock.now())
            for n in range(start, min(messages, start + chunk))
        ]
        async with engine.begin() as c:
            await c.execute(tables_for("ledger").outbox.insert(), rows)


async def relay_memory(database_url: str, amqp_url: str, messages: int) -> dict[str, float]:
    """Relay `messages` pre-committed rows and sample the process's RSS as it goes."""
    engine = create_engine(database_url)
    transport = RabbitTransport(amqp_url)
    await transport.connect()
    clock = SystemClock()
    try:
        await upgrade(engine)
        await _declare_bench_queue(transport)
        async with engine.begin() as c:
            await c.execute(text("TRUNCATE ledger_outbox, ledger_inbox"))
        await _precommit(engine, messages, clock)
        # Drain the bench queue as fast as possible so the broker does not hold 100k messages.
        connection = await aio_pika.connect_robust(amqp_url)
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=500)
        queue = await channel.declare_queue(BENCH_QUEUE.name, passive=True)
        async def discard(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.ack()

        await queue.consume(discard)
        relay = Relay(engine, "ledger", transport, clock, batch_size=500)
        samples = [rss_mb()]
        started = time.perf_counter()
        published = 0
        while published < messages:
            count = await relay.relay_once()
            if count == 0:
                break
            published += count
            if published % 10_000 < count:
                samples.append(rss_mb())
        elapsed = time.perf_counter() - started
        samples.append(rss_mb())
        await connection.close()
        return {
            "messages": published,
            "relay_only_per_s": published / elapsed,
            "rss_start_mb": samples[0],
            "rss_after_10k_mb": samples[min(1, len(samples) - 1)],
            "rss_end_mb": samples[-1],
            "rss_max_mb": max(samples),
        }
    finally:
        await transport.close()
        await engine.dispose()


async def _declare_bench_queue(transport: RabbitTransport) -> None:
    await transport.declare_topology()
    channel = await transport.connection.channel()
    queue = await channel.declare_queue(BENCH_QUEUE.name, durable=True, arguments={"x-queue-type": "classic"})
    await queue.bind(t.EVENTS.name, routing_key=LedgerUpdated.message_type)
    await queue.purge()
    await channel.close()


# ---------------------------------------------------------------- Postgres limit for saga-shaped transactions


async def postgres_commit_rate(database_url: str, seconds: float = 3.0, concurrency: int = 20) -> float:
    """Commits/s of the saga's transaction shape: inbox insert + row update + outbox insert."""
    engine = create_engine(database_url, pool_size=concurrency)
    try:
        async with engine.begin() as c:
            await c.execute(text("CREATE UNLOGGED TABLE IF NOT EXISTS bench_rows (id int primary key, n bigint)"))
            await c.execute(text("CREATE TABLE IF NOT EXISTS bench_inbox (id uuid primary key)"))
            await c.execute(text("CREATE TABLE IF NOT EXISTS bench_outbox (id bigserial primary key, body text)"))
            await c.execute(text("TRUNCATE bench_rows, bench_inbox, bench_outbox"))
            await c.execute(text("INSERT INTO bench_rows SELECT g, 0 FROM generate_series(1, 1000) g"))
        deadline = time.perf_counter() + seconds
        commits = 0

        async def worker(w: int) -> None:
            nonlocal commits
            n = 0
            while time.perf_counter() < deadline:
                async with engine.begin() as c:
                    await c.execute(text("INSERT INTO bench_inbox VALUES (:id)"), {"id": uuid.uuid4()})
                    await c.execute(text("UPDATE bench_rows SET n = n + 1 WHERE id = :id"), {"id": (w * 50 + n) % 1000 + 1})
                    await c.execute(text("INSERT INTO bench_outbox (body) VALUES (:b)"), {"b": "x" * 400})
                commits += 1
                n += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        rate = commits / (time.perf_counter() - started)
        async with engine.begin() as c:
            await c.execute(text("DROP TABLE bench_rows, bench_inbox, bench_outbox"))
        return rate
    finally:
        await engine.dispose()


# ---------------------------------------------------------------- the saga end to end


#: How `bench saga --processes` splits the services over OS processes (GIL: one core each).
PROCESS_LAYOUT: tuple[tuple[str, ...], ...] = (
    ("run", "--service", "saga", "--no-relay"),
    ("run", "--service", "stock", "--service", "payments", "--service", "ledger", "--service", "orders", "--no-relay"),
    ("relay",),
)


async def _start_processes(database_url: str, amqp_url: str) -> list[Any]:
    import subprocess
    import sys
    from pathlib import Path

    compensa = str(Path(sys.executable).with_name("compensa"))
    env = {
        **os.environ,
        "COMPENSA_DATABASE_URL": database_url,
        "COMPENSA_AMQP_URL": amqp_url,
        "COMPENSA_LOG_LEVEL": "WARNING",
        "COMPENSA_RELAY_POLL_SECONDS": "0.05",
        "COMPENSA_PREFETCH": "64",
    }
    return [subprocess.Popen([compensa, *args], env=env) for args in PROCESS_LAYOUT]


async def _stop_processes(processes: list[Any]) -> None:
    import signal

    for process in processes:
        process.send_signal(signal.SIGTERM)
    deadline = time.perf_counter() + 30
    for process in processes:
        while process.poll() is None and time.perf_counter() < deadline:
            await asyncio.sleep(0.1)
        if process.poll() is None:
            process.kill()


async def saga_rate(
    database_url: str, amqp_url: str, inflight: int, seconds: float, *, processes: bool = False
) -> dict[str, float]:
    """Closed loop: `inflight` clients each place an order and wait for its completion.

    In-process (one Runtime with every service) or, with `processes`, the services
    spread over OS processes as in PROCESS_LAYOUT; completion is then observed on a
    queue of the bench's own bound to `order.completed`.
    """
    from sqlalchemy import select

    from consumers.orders import place_order
    from consumers.orders.tables import orders_orders
    from consumers.stock import seed_stock
    from infra.services import Runtime
    from sagas.tables import saga_instances

    settings = Settings(
        database_url=database_url, amqp_url=amqp_url, relay_poll_seconds=0.05, deadline_sweep_seconds=1.0, prefetch=64
    )
    engine = create_engine(database_url, pool_size=30)
    transport = RabbitTransport(amqp_url, retry_delays_ms=t.retry_delays_ms(settings.max_attempts, settings.retry_base_seconds, settings.retry_max_seconds))
    await transport.connect()
    clock = SystemClock()
    waiting: dict[str, asyncio.Future[None]] = {}

    def completed(order_id: str) -> None:
        future = waiting.get(order_id)
        if future is not None and not future.done():
            future.set_result(None)

    runtime = None
    children: list[Any] = []
    try:
        await upgrade(engine)
        await transport.declare_topology()
        await seed_stock(engine, {f"BENCH-{i}": 10_000_000 for i in range(20)})
        if processes:
            channel = await transport.connection.channel()
            queue = await channel.declare_queue(exclusive=True)
            await queue.bind(t.EVENTS.name, routing_key="order.completed")

            async def on_completed_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                await message.ack()
                completed(message.correlation_id or "")

            await queue.consume(on_completed_message)
            children = await _start_processes(database_url, amqp_url)
        else:
            runtime = Runtime(engine, transport, clock, settings, ["saga", "stock", "payments", "ledger", "orders"])
            await runtime.start()
            orders_processor = runtime.processors["orders"]
            completed_handler = orders_processor.handlers["order.completed"]

            async def on_completed(uow: UnitOfWork, message: Any) -> None:
                await completed_handler(uow, message)
                completed(message.correlation_id)

            orders_processor.handlers["order.completed"] = on_completed
        placed: list[str] = []
        run_id = uuid.uuid4().hex[:6]

        async def one_saga(order_id: str, c: int, n: int) -> None:
            waiting[order_id] = asyncio.get_running_loop().create_future()
            await place_order(
                engine, clock, order_id=order_id, customer_id=f"c{c}",
                lines=[OrderLine(sku=f"BENCH-{(c + n) % 20}", quantity=1, unit_price=1000)],
                currency="EUR", payment_token=f"tok_ok_{c}",
            )
            await asyncio.wait_for(waiting[order_id], timeout=60)

        # Warm up: the services (or processes) are consuming once one saga went through.
        await one_saga(f"b{run_id}-warmup", 0, 0)
        deadline = time.perf_counter() + seconds

        async def client(c: int) -> None:
            n = 0
            while time.perf_counter() < deadline:
                order_id = f"b{run_id}-{inflight}-{c}-{n}"
                n += 1
                await one_saga(order_id, c, n)
                placed.append(order_id)

        started = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(inflight)))
        elapsed = time.perf_counter() - started
        async with engine.connect() as c:
            rows = (
                await c.execute(
                    select(orders_orders.c.created_at, saga_instances.c.updated_at)
                    .join(saga_instances, saga_instances.c.saga_id == orders_orders.c.order_id)
                    .where(orders_orders.c.order_id.in_(placed), saga_instances.c.status == "completed")
                )
            ).all()
        latencies = sorted((done - created).total_seconds() * 1000 for created, done in rows)
        return {
            "inflight": inflight,
            "completed": len(rows),
            "sagas_per_s": len(rows) / elapsed,
            "p50_ms": _pct(latencies, 50),
            "p99_ms": _pct(latencies, 99),
        }
    finally:
        if runtime is not None:
            await runtime.stop()
        await _stop_processes(children)
        await transport.close()
        await engine.dispose()


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


# ---------------------------------------------------------------- simulation speed


def _simulation_spec(sagas: int) -> Any:
    from sagas.simulation.workload import WorkloadSpec

    # Enough stock that most orders go the whole way (reserve, charge, commit): the
    # heavier path, rather than a run that is mostly quick rejections.
    return WorkloadSpec(sagas=sagas, stock_per_sku=max(60, sagas // 2))


def simulation_rate(sagas: int, faults: str = "chaos", seed: int = 1) -> dict[str, float]:
    """Simulated sagas per wall second (SQLite, in-memory broker, virtual clock)."""
    from infra.simulate import SimulationOptions, run_simulation
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
        "outcomes": result.outcomes,  # type: ignore[dict-item]
    }


async def real_stack_rate(database_url: str, amqp_url: str, sagas: int, faults: str = "chaos", seed: int = 1) -> dict[str, float]:
    """The same kind of workload end to end on PostgreSQL and RabbitMQ, in wall time.

    A real-stack run checks every row, so it gets a scratch database of its own. The
    broker is shared: a run refuses (RealStackError) when compensa's queues hold
    messages or have consumers, rather than touching them. The rate counts from the
    first order placed to the last saga settled, without setup and checking.
    """
    from infra.realstack import run_real_stack
    from sagas.simulation.faults import profile

    async with scratch_database(database_url) as scratch_url:
        # Orders arrive faster than this machine completes them; deadlines long enough
        # that the backlog is measured as throughput, not turned into timeouts.
        result = await run_real_stack(
            seed, _simulation_spec(sagas), amqp_url=amqp_url, database_url=scratch_url, faults=profile(faults),
            timeout=600, saga_deadline_seconds=120.0, arrival_scale=0.01,
        )
    run_seconds = result.virtual_seconds  # the real stack's clock: first order to quiet
    return {
        "sagas": sagas,
        "sagas_per_s": sagas / run_seconds,
        "wall_s": run_seconds,
        "invariants_ok": float(result.ok),
        "outcomes": result.outcomes,  # type: ignore[dict-item]
    }


def environment_urls() -> tuple[str, str]:
    database_url = os.environ.get("COMPENSA_DATABASE_URL", "")
    amqp_url = os.environ.get("COMPENSA_AMQP_URL", "")
    if not database_url.startswith("postgresql") or not amqp_url:
        raise ValueError(
            "benchmarks need PostgreSQL and RabbitMQ: set COMPENSA_DATABASE_URL=postgresql+asyncpg://… and "
            "COMPENSA_AMQP_URL=amqp://…, or run `bash scripts/bench.sh`, which starts both"
        )
    return database_url, amqp_url
