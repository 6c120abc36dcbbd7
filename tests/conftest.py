"""Shared fixtures: real servers for integration tests, started once and only on request.

Unit and simulation tests request none of these fixtures, so they never start a server.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from infra.telemetry.tracing import configure_tracing
from tests.harness.servers import Server, Servers, local_servers

_SERVERS = pytest.StashKey[Servers]()

# The test process records spans from the start: OpenTelemetry lets a process install
# its tracer provider once, and a CLI command run in-process (which configures telemetry
# as `compensa-cli`) must keep this one. Tests that look at spans add an exporter to it.
configure_tracing("compensa-tests")


@pytest.fixture(scope="session")
def servers(request: pytest.FixtureRequest) -> Iterator[Servers]:
    """PostgreSQL, RabbitMQ and Redis, started together the first time a test needs one."""
    with local_servers() as running:
        request.config.stash[_SERVERS] = running
        yield running


@pytest.fixture(scope="session")
def database_url(servers: Servers) -> str:
    """``postgresql+asyncpg://`` URL of the session's PostgreSQL database."""
    return servers.database_url


@pytest.fixture(scope="session")
def amqp_url(servers: Servers) -> str:
    return servers.amqp_url


@pytest.fixture(scope="session")
def redis_url(servers: Servers) -> str:
    return servers.redis_url


@pytest.fixture
def redis_server(servers: Servers) -> Iterator[Server]:
    """The session's Redis with ``stop()``/``start()``, running again after each test.

    Only a Redis the harness started itself can be taken down; with a Redis from the
    environment or from Docker the test is skipped.
    """
    server = servers.redis
    if not server.controllable:
        pytest.skip(f"stopping Redis needs the harness's own redis-server; this one is from {server.origin}")
    yield server
    if not server.running:
        server.start()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """Say where the servers came from and how long they took, when a test used them."""
    running = config.stash.get(_SERVERS, None)
    if running is not None:
        terminalreporter.write_sep("-", "test servers")
        terminalreporter.write_line(running.summary())
