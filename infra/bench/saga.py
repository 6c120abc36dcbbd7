"""The saga end to end: completed sagas/s and latency from `order.created` committed to
`order.completed` committed, in one process or with the services in separate processes."""

from __future__ import annotations

import asyncio
import functools
import os
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import aio_pika
from opentelemetry import context as otel_context
from opentelemetry import trace

from contracts.messages import OrderLine
from infra import topology as t
from infra.bench.common import closed_loop, percentile
from infra.bench.cost import CostMeter, per_saga
from infra.bench.observers import ObserverProcess, otlp_receiver, scraper
from infra.bootstrap import bootstrap
from infra.clock import SystemClock
from infra.db import create_engine
from infra.runtime import Runtime
from infra.schema import upgrade
from infra.settings import Settings
from infra.transport.rabbit import RabbitTransport
from outbox.uow import UnitOfWork

#: How `bench saga --processes` splits the services over OS processes (GIL: one core each).
PROCESS_LAYOUT: tuple[tuple[str, ...], ...] = (
    ("run", "--service", "saga", "--no-relay"),
    ("run", "--service", "stock", "--service", "payments", "--service", "ledger", "--service", "orders", "--no-relay"),
    ("relay",),
)


async def _start_processes(
    database_url: str, amqp_url: str, extra_env: Mapping[str, str], metrics_ports: Sequence[int] = ()
) -> list[Any]:
    """PROCESS_LAYOUT's processes; with `metrics_ports`, each serves /metrics on its own."""
    import subprocess
    import sys
    from pathlib import Path

    compensa = str(Path(sys.executable).with_name("compensa"))
    env = {
        **os.environ,
        "COMPENSA_DATABASE_URL": database_url,
        "COMPENSA_AMQP_URL": amqp_url,
        "COMPENSA_LOG_LEVEL": "WARNING",
        "COMPENSA_PREFETCH": "64",
        **extra_env,
    }
    children = []
    for n, args in enumerate(PROCESS_LAYOUT):
        metrics = ["--metrics-port", str(metrics_ports[n])] if metrics_ports else []
        children.append(subprocess.Popen([compensa, *args, *metrics], env=env))  # noqa: ASYNC220 - returns at once
    return children


async def _stop_processes(processes: list[Any]) -> None:
    import signal

    for process in processes:
        process.send_signal(signal.SIGTERM)
    deadline = time.perf_counter() + 30
    for process in processes:
        while process.poll() is None and time.perf_counter() < deadline:  # noqa: ASYNC110 - a process has no Event
            await asyncio.sleep(0.1)
        if process.poll() is None:
            process.kill()


def sampled_parent() -> otel_context.Context:
    """A context whose (remote) parent span is sampled: an upstream caller that records its traces."""
    parent = trace.SpanContext(
        trace_id=random.getrandbits(128) or 1,
        span_id=random.getrandbits(64) or 1,
        is_remote=True,
        trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
    )
    return trace.set_span_in_context(trace.NonRecordingSpan(parent))


#: Labels of PROCESS_LAYOUT's processes in the cost figures.
PROCESS_LABELS = ("saga", "participants", "relay")


async def saga_rate(
    database_url: str,
    amqp_url: str,
    inflight: int,
    seconds: float,
    *,
    processes: bool = False,
    management_url: str | None = None,
    extra_env: Mapping[str, str] | None = None,
    metrics_ports: Sequence[int] = (),
    sampled: bool = False,
    after_window: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, Any]:
    """Closed loop: `inflight` clients each place an order and wait for its completion.

    In-process (one Runtime with every service) or, with `processes`, the services
    spread over OS processes as in PROCESS_LAYOUT; completion is then observed on a
    queue of the bench's own bound to `order.completed`. The cost per completed saga
    (CPU of each process, transactions, statements, publishes, deliveries) is counted
    over the same window; the bench process places the orders, which is the orders
    service's own work, so its CPU counts too. `extra_env` and `metrics_ports` go to
    the processes, and `sampled` places each order inside a sampled caller's trace, as
    an upstream that samples would (telemetry on or off: `bench telemetry`).
    `after_window` is awaited once the measured window closes, before anything stops.
    """
    from sqlalchemy import select

    from consumers.orders import place_order
    from consumers.orders.tables import orders_orders
    from consumers.stock import seed_stock
    from sagas.tables import saga_instances

    settings = Settings(database_url=database_url, amqp_url=amqp_url, deadline_sweep_seconds=1.0, prefetch=64)
    engine = create_engine(database_url, pool_size=30)
    transport = RabbitTransport(
        amqp_url,
        retry_delays_ms=t.retry_delays_ms(settings.max_attempts, settings.retry_base_seconds, settings.retry_max_seconds),
    )
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
            children = await _start_processes(database_url, amqp_url, extra_env or {}, metrics_ports)
        else:

            def observe_completions(service: str, handlers: Mapping[str, Any]) -> Mapping[str, Any]:
                # Handed to the composition root: the orders service's own handler, then the bench's note.
                if service != "orders":
                    return handlers
                completed_handler = handlers["order.completed"]

                async def on_completed(uow: UnitOfWork, message: Any) -> None:
                    await completed_handler(uow, message)
                    completed(message.correlation_id)

                return {**handlers, "order.completed": on_completed}

            registry = bootstrap(settings, wrap_handlers=observe_completions)
            runtime = Runtime(
                engine, transport, clock, settings, ["saga", "stock", "payments", "ledger", "orders"], registry=registry
            )
            await runtime.start()
        placed: list[str] = []
        run_id = uuid.uuid4().hex[:6]

        async def one_saga(order_id: str, c: int, n: int) -> None:
            waiting[order_id] = asyncio.get_running_loop().create_future()
            # A sampled caller's trace when asked: every span of the saga is then recorded.
            token = otel_context.attach(sampled_parent()) if sampled else None
            try:
                await place_order(
                    engine,
                    clock,
                    order_id=order_id,
                    customer_id=f"c{c}",
                    lines=[OrderLine(sku=f"BENCH-{(c + n) % 20}", quantity=1, unit_price=1000)],
                    currency="EUR",
                    payment_token=f"tok_ok_{c}",
                )
            finally:
                if token is not None:
                    otel_context.detach(token)
            await asyncio.wait_for(waiting[order_id], timeout=60)

        # Warm up: the services (or processes) are consuming once one saga went through.
        await one_saga(f"b{run_id}-warmup", 0, 0)

        async def client(c: int, n: int) -> None:
            order_id = f"b{run_id}-{inflight}-{c}-{n}"
            await one_saga(order_id, c, n + 1)
            placed.append(order_id)

        watched: dict[str, int | None] = {"client" if processes else "compensa": None}
        watched.update(zip(PROCESS_LABELS, (child.pid for child in children), strict=False))
        meter = CostMeter(engine, management_url, watched)
        await meter.settle()
        before = await meter.snapshot()
        # The loop's own latencies include placing the order; the figures below are the
        # database's: order committed to saga completed.
        started = time.perf_counter()
        await closed_loop(inflight, seconds, client)
        elapsed = time.perf_counter() - started
        after = await meter.closing_snapshot()
        if after_window is not None:
            await after_window()
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
            "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99),
            "per_saga": per_saga(before, after, len(rows)),
        }
    finally:
        if runtime is not None:
            await runtime.stop()
        await _stop_processes(children)
        await transport.close()
        await engine.dispose()


# ---------------------------------------------------------------- telemetry off vs on
#
# "On" is production with a collector and Prometheus: spans and metrics pushed over
# OTLP/HTTP to a local receiver, every process's /metrics scraped every `scrape_seconds`
# (the shipped Prometheus configuration scrapes every 15 s). "Off" is the default:
# nothing exported (spans get ids, nothing is recorded). Receiver and scraper run in
# processes of their own (infra/bench/observers.py), as a collector and Prometheus would.


def _free_ports(n: int) -> list[int]:
    import socket

    ports = []
    for _ in range(n):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    return ports


async def telemetry_cost(
    database_url: str,
    amqp_url: str,
    inflight: int,
    seconds: float,
    rounds: int,
    management_url: str | None,
    scrape_seconds: float = 5.0,
) -> dict[str, Any]:
    """Run off and on `rounds` times each, in ABBA order; each run's per-saga cost, and what the exporters carried."""
    runs: list[dict[str, Any]] = []
    receiver, endpoint = otlp_receiver()
    try:
        for round_number in range(rounds):
            # off, on, on, off, ...: the database grows run by run, and neither mode always runs on the bigger one.
            for mode in ("off", "on") if round_number % 2 == 0 else ("on", "off"):
                env = {"OTEL_SDK_DISABLED": "false"}
                ports: list[int] = []
                counts: dict[str, int] = {"scrapes": 0, "bytes": 0, "failed": 0}
                scraping = None
                if mode == "on":
                    env |= {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_METRIC_EXPORT_INTERVAL": "5000"}
                    ports = _free_ports(len(PROCESS_LAYOUT))
                    scraping = scraper(ports, scrape_seconds)
                try:
                    result = await saga_rate(
                        database_url,
                        amqp_url,
                        inflight,
                        seconds,
                        processes=True,
                        management_url=management_url,
                        extra_env=env,
                        metrics_ports=ports,
                        sampled=mode == "on",
                        # Scrapes end with the measured window, before the processes stop answering.
                        after_window=functools.partial(_finish_into, counts, scraping) if scraping else None,
                    )
                finally:
                    if scraping is not None:
                        await _finish_into(counts, scraping)
                result["mode"] = mode
                result["scrapes"] = counts
                runs.append(result)
    finally:
        received = await receiver.finish()
    return {
        "runs": runs,
        "otlp_requests": received["requests"],
        "otlp_bytes": received["bytes"],
        "scrape_seconds": scrape_seconds,
    }


async def _finish_into(counts: dict[str, int], scraping: ObserverProcess) -> None:
    """Stop the scraper (once) and keep what it counted."""
    counts.update(await scraping.finish())
