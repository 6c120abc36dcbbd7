"""Fixtures for end-to-end saga tests: whole sagas through the real relay and consumers.

What they build (``Stack``, ``Process``) and the tests' helpers are in support.py.

- ``stack``: per test module, a fresh PostgreSQL database migrated to head and emptied
  RabbitMQ queues (every work queue, its delay queues and its dead-letter queue).
- ``services``: ``await services("saga", "stock", settings=...)`` starts an in-process
  ``Runtime`` (consumers, relays, sweepers) on its own RabbitMQ connection; every
  runtime a test started is stopped after it.
- ``processes``: ``processes("saga")`` starts ``compensa run --service saga`` as an OS
  process pointed at the module's database; every process still running after the
  test is killed. Its output goes to a log file whose tail a failing test prints.
"""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import structlog

from infra.bootstrap import MESSAGE_SERVICES, Registry
from infra.clock import SystemClock
from infra.db import create_engine, scratch_database
from infra.logging import configure_logging
from infra.runtime import Runtime
from infra.schema import upgrade
from infra.settings import Settings
from infra.transport.base import Transport
from infra.transport.factory import transport_from_settings
from tests.e2e.support import METRICS, Process, Stack, StartServices, all_queue_names
from tests.support import COMPENSA

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session", autouse=True)
def _quiet_logs() -> Iterator[None]:
    """Warnings and errors only: 200 sagas at INFO would bury a failure's output."""
    configure_logging("WARNING", "console")
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="module")
async def stack(database_url: str, amqp_url: str, request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    """A fresh migrated database for the module, and every compensa queue emptied."""
    module = request.module.__name__.rsplit(".", 1)[-1]
    async with scratch_database(database_url, f"e2e_{module}") as url:
        engine = create_engine(url)
        connection = await aio_pika.connect(amqp_url)
        try:
            await upgrade(engine)
            channel = await connection.channel()
            stack = Stack(url, amqp_url, engine, channel)
            transport = await transport_from_settings(stack.settings())
            try:
                await transport.declare_topology()
            finally:
                await transport.close()
            for queue_name in all_queue_names(stack.settings()):
                queue = await channel.get_queue(queue_name, ensure=True)
                await queue.purge()
            yield stack
        finally:
            await connection.close()
            await engine.dispose()


@pytest.fixture
async def services(stack: Stack) -> AsyncIterator[StartServices]:
    """``await services(*names, settings=None, wrap=None, registry=None)``: start an in-process runtime.

    No names means every service. `wrap` takes the connected RabbitTransport and
    returns the transport the runtime uses (to inject duplicate or reordered delivery).
    `registry` is the services as `bootstrap` built them (with fault hooks, say);
    by default, built from the settings.
    """
    started: list[tuple[Runtime, Transport]] = []

    async def start(
        *names: str,
        settings: Settings | None = None,
        wrap: Callable[[Transport], Transport] | None = None,
        registry: Registry | None = None,
    ) -> Runtime:
        settings = settings or stack.settings()
        rabbit = await transport_from_settings(settings)
        transport = wrap(rabbit) if wrap else rabbit
        runtime = Runtime(stack.engine, transport, SystemClock(), settings, names or MESSAGE_SERVICES, registry=registry)
        started.append((runtime, rabbit))
        await runtime.start()
        return runtime

    yield start
    for runtime, rabbit in reversed(started):
        await runtime.stop()
        await rabbit.close()


@pytest.fixture
def processes(stack: Stack, tmp_path: Path) -> Iterator[Callable[..., Process]]:
    """``processes(*services, **settings)``: start `compensa run` on the module's stack."""
    started: list[Process] = []

    def spawn(*names: str, **overrides: Any) -> Process:
        args = [COMPENSA, "run", *(arg for n in names for arg in ("--service", n))]
        log = tmp_path / f"compensa-{len(started)}-{'-'.join(names) or 'all'}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(args, env=stack.env(**overrides), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        process = Process(popen, log)
        started.append(process)
        return process

    yield spawn
    for process in started:
        if process.popen.poll() is None:
            process.popen.kill()
            process.popen.wait(timeout=10)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if METRICS:
        terminalreporter.write_sep("-", "e2e metrics")
        for key, value in METRICS.items():
            terminalreporter.write_line(f"{key}: {value}")
