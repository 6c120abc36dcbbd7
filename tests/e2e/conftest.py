"""Fixtures for end-to-end saga tests: whole sagas through the real relay and consumers.

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

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from infra import topology as t
from infra.clock import SystemClock
from infra.db import create_engine, scratch_database
from infra.logging import configure_logging
from infra.schema import upgrade
from infra.services import SERVICES, Runtime
from infra.settings import Settings
from infra.transport.base import Transport
from infra.transport.factory import transport_from_settings

ROOT = Path(__file__).resolve().parents[2]
#: The console script next to the interpreter running the tests (the project's venv).
COMPENSA = str(Path(sys.executable).with_name("compensa"))

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


StartServices = Callable[..., Awaitable[Runtime]]


@pytest.fixture
async def services(stack: Stack) -> AsyncIterator[StartServices]:
    """``await services(*names, settings=None, wrap=None)``: start an in-process runtime.

    No names means every service. `wrap` takes the connected RabbitTransport and
    returns the transport the runtime uses (to inject duplicate or reordered delivery).
    """
    started: list[tuple[Runtime, Transport]] = []

    async def start(
        *names: str,
        settings: Settings | None = None,
        wrap: Callable[[Transport], Transport] | None = None,
    ) -> Runtime:
        settings = settings or stack.settings()
        rabbit = await transport_from_settings(settings)
        transport = wrap(rabbit) if wrap else rabbit
        runtime = Runtime(stack.engine, transport, SystemClock(), settings, list(names or SERVICES))
        started.append((runtime, rabbit))
        await runtime.start()
        return runtime

    yield start
    for runtime, rabbit in reversed(started):
        await runtime.stop()
        await rabbit.close()


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
