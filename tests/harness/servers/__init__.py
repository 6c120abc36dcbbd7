"""Real PostgreSQL, RabbitMQ and Redis servers for a test session.

Integration tests run against real servers, never mocks of them. Each service resolves,
in this order:

1. a URL from the environment: ``COMPENSA_TEST_DATABASE_URL`` (postgresql+asyncpg://...),
   ``COMPENSA_TEST_AMQP_URL`` (with ``COMPENSA_TEST_AMQP_MANAGEMENT_URL`` for its management
   API; derived from the AMQP URL, port 15672, when unset), ``COMPENSA_TEST_REDIS_URL``;
2. a Docker container via testcontainers, when a Docker daemon answers;
3. the machine's own binaries (Debian packages, installed when missing), started by the
   harness on free TCP ports in a temporary directory and stopped when the session ends.

RabbitMQ always comes with its management plugin (``Server.management_url``): `compensa
health` reads queue statistics through its HTTP API.

Prometheus is not a session service: a test that checks what compensa exports starts
its own with :func:`local_prometheus` (module ``prometheus``), scraping the targets it
sets, and runs ``promtool`` with :func:`promtool`.

Use :func:`local_servers` as a context manager, or run ``python -m tests.harness.servers``
to keep a set of servers running for a shell session or a benchmark.

One module per concern: ``base`` (service names, errors, ``Server``), ``process`` (ports,
commands, readiness, stopping), ``install`` (apt-get), ``local`` (servers from local
binaries), ``containers`` (Docker), ``resolve`` (environment → Docker → local, the
session), ``prometheus`` (a Prometheus a test configures, promtool), ``__main__`` (the
``python -m`` entry).
"""

from tests.harness.servers.base import (
    POSTGRES,
    PROMETHEUS,
    RABBITMQ,
    REDIS,
    SERVICES,
    HarnessError,
    NotControllable,
    Server,
)
from tests.harness.servers.containers import DockerServer, docker_available
from tests.harness.servers.install import ensure_installed
from tests.harness.servers.local import LocalPostgres, LocalRabbitMQ, LocalRedis, LocalServer
from tests.harness.servers.process import free_port
from tests.harness.servers.prometheus import LocalPrometheus, local_prometheus, promtool
from tests.harness.servers.resolve import Servers, local_servers

__all__ = [
    "POSTGRES",
    "PROMETHEUS",
    "RABBITMQ",
    "REDIS",
    "SERVICES",
    "DockerServer",
    "HarnessError",
    "LocalPostgres",
    "LocalPrometheus",
    "LocalRabbitMQ",
    "LocalRedis",
    "LocalServer",
    "NotControllable",
    "Server",
    "Servers",
    "docker_available",
    "ensure_installed",
    "free_port",
    "local_prometheus",
    "local_servers",
    "promtool",
]
