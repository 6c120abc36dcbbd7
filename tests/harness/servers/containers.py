"""Docker: the servers as testcontainers containers, when a Docker daemon answers."""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

from tests.harness.servers.base import POSTGRES, RABBITMQ, RABBITMQ_STATS_CONF, REDIS, Server
from tests.harness.servers.process import amqp_ready, management_ready, wait_for

log = logging.getLogger(__name__)

DOCKER_IMAGES = {POSTGRES: "postgres:15-alpine", RABBITMQ: "rabbitmq:3.13-management-alpine", REDIS: "redis:7-alpine"}


class DockerServer(Server):
    """A testcontainers container, stopped and removed at the end of the session."""

    def __init__(self, name: str, container: object, url: str) -> None:
        super().__init__(name, "docker", url)
        self._container = container

    def close(self) -> None:
        self._container.stop()  # type: ignore[attr-defined]


def docker_available() -> bool:
    """Whether a Docker daemon answers; without one testcontainers raises DockerException."""
    try:
        import docker

        client = docker.from_env(timeout=3)
        try:
            client.ping()
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - DockerException, connection errors, or no docker package at all
        return False
    return True


def _testcontainer(module: str, name: str) -> type:
    """testcontainers moved its modules under ``community`` in 4.x; accept either."""
    import importlib

    for path in (f"testcontainers.community.{module}", f"testcontainers.{module}"):
        with contextlib.suppress(ImportError):
            return getattr(importlib.import_module(path), name)
    raise ImportError(f"testcontainers has no {name}")


def from_docker(name: str) -> Server | None:
    """Start the service in a container; None (so the caller falls back) when that fails."""
    container = None
    try:
        if name == POSTGRES:
            postgres = _testcontainer("postgres", "PostgresContainer")
            container = postgres(
                DOCKER_IMAGES[POSTGRES],
                username="postgres",
                password="postgres",
                dbname="compensa",
                driver="asyncpg",
            ).with_command("postgres -c max_connections=200 -c shared_preload_libraries=pg_stat_statements")
            container.start()
            url = container.get_connection_url()
        elif name == REDIS:
            container = _testcontainer("redis", "RedisContainer")(DOCKER_IMAGES[REDIS])
            container.start()
            url = f"redis://{container.get_container_host_ip()}:{container.get_exposed_port(6379)}/0"
        else:
            # RabbitMqContainer probes readiness with pika, which the project does not use.
            from testcontainers.core.container import DockerContainer

            conf = Path(tempfile.mkdtemp(prefix="compensa-rabbitmq-")) / "90-compensa-stats.conf"
            conf.write_text(RABBITMQ_STATS_CONF)
            conf.parent.chmod(0o755)
            conf.chmod(0o644)
            container = (
                DockerContainer(DOCKER_IMAGES[RABBITMQ])
                .with_exposed_ports(5672, 15672)
                .with_volume_mapping(str(conf), "/etc/rabbitmq/conf.d/90-compensa-stats.conf", "ro")
            )
            container.start()
            host, port = container.get_container_host_ip(), container.get_exposed_port(5672)
            url = f"amqp://guest:guest@{host}:{port}/"
            management_url = f"http://guest:guest@{host}:{container.get_exposed_port(15672)}/"
            wait_for(
                lambda: amqp_ready(url) and management_ready(management_url),
                what="RabbitMQ container",
                interval=0.5,
            )
    except Exception as error:  # noqa: BLE001 - whatever Docker does wrong, local binaries are the fallback
        log.warning("%s: Docker failed (%s); falling back to local binaries", name, error)
        if container is not None:
            with contextlib.suppress(Exception):
                container.stop()
        return None
    server = DockerServer(name, container, url)
    if name == RABBITMQ:
        server.management_url = management_url
    return server
