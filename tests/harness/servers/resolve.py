"""Resolution: each service from the environment, else Docker, else local binaries; the session."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from infra.settings import derive_management_url
from tests.harness.servers.base import (
    APP_ENV_URLS,
    APP_MANAGEMENT_ENV_URL,
    ENV_URLS,
    MANAGEMENT_ENV_URL,
    POSTGRES,
    RABBITMQ,
    REDIS,
    SERVICES,
    HarnessError,
    Server,
)
from tests.harness.servers.containers import docker_available, from_docker
from tests.harness.servers.install import ensure_installed
from tests.harness.servers.local import LOCAL_SERVERS

log = logging.getLogger(__name__)


class Servers:
    """The servers of one session by service name, with their URLs."""

    def __init__(self, by_name: dict[str, Server]) -> None:
        self.by_name = by_name
        self.stop_seconds: float | None = None

    def _get(self, name: str) -> Server:
        try:
            return self.by_name[name]
        except KeyError:
            raise HarnessError(f"{name} was not requested from local_servers(need=...)") from None

    @property
    def postgres(self) -> Server:
        return self._get(POSTGRES)

    @property
    def rabbitmq(self) -> Server:
        return self._get(RABBITMQ)

    @property
    def redis(self) -> Server:
        return self._get(REDIS)

    @property
    def database_url(self) -> str:
        return self.postgres.url

    @property
    def amqp_url(self) -> str:
        return self.rabbitmq.url

    @property
    def redis_url(self) -> str:
        return self.redis.url

    @property
    def amqp_management_url(self) -> str:
        """RabbitMQ's management API, ``http://user:password@host:port/``."""
        return self.rabbitmq.management_url

    def exports(self) -> str:
        """Shell lines exporting the URLs for the test suite and for the application."""
        lines = []
        for table in (ENV_URLS, APP_ENV_URLS):
            lines += [f"export {table[name]}='{server.url}'" for name, server in sorted(self.by_name.items())]
        if RABBITMQ in self.by_name:
            management = self.by_name[RABBITMQ].management_url
            lines += [f"export {MANAGEMENT_ENV_URL}='{management}'", f"export {APP_MANAGEMENT_ENV_URL}='{management}'"]
        return "\n".join(lines)

    def summary(self) -> str:
        lines = [
            f"{name}: {server.origin}, ready in {server.startup_seconds:.1f}s, {server.url}"
            for name, server in sorted(self.by_name.items())
        ]
        if self.stop_seconds is not None:
            lines.append(f"stopped in {self.stop_seconds:.1f}s")
        return "\n".join(lines)


def _start_service(name: str, workdir: Path, docker: bool) -> Server:
    """Resolve one service: environment URL, then Docker, then local binaries."""
    started = time.monotonic()
    server: Server | None = None
    if url := os.environ.get(ENV_URLS[name]):
        server = Server(name, "env", url)
        if name == RABBITMQ:
            server.management_url = os.environ.get(MANAGEMENT_ENV_URL) or derive_management_url(url)
    elif docker:
        server = from_docker(name)
    if server is None:
        ensure_installed([name])
        local = LOCAL_SERVERS[name](workdir)
        try:
            local.boot()
        except BaseException:
            with contextlib.suppress(Exception):
                local.close()
            raise
        server = local
    server.startup_seconds = time.monotonic() - started
    log.info("%s: %s, ready in %.1fs at %s", name, server.origin, server.startup_seconds, server.url)
    return server


def _close_all(servers: Iterable[Server]) -> None:
    """Stop servers concurrently: a RabbitMQ node alone takes seconds to shut down."""
    servers = list(servers)
    if not servers:
        return
    with ThreadPoolExecutor(max_workers=len(servers), thread_name_prefix="compensa-stop") as pool:
        for server, future in [(server, pool.submit(server.close)) for server in servers]:
            try:
                future.result()
            except Exception:
                log.exception("stopping %r failed", server)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so a cancelled CI job still stops the servers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def local_servers(need: Iterable[str] = SERVICES) -> Iterator[Servers]:
    """Start the needed servers concurrently; stop the ones the harness started on exit.

    Example::

        with local_servers(need={"postgres", "redis"}) as servers:
            engine = create_async_engine(servers.database_url)
    """
    need = set(need)
    if unknown := need - SERVICES:
        raise ValueError(f"unknown services {sorted(unknown)}; choose from {sorted(SERVICES)}")
    workdir = Path(tempfile.mkdtemp(prefix="compensa-test-"))
    workdir.chmod(0o755)  # the postgres user must reach its own subdirectory
    running = Servers({})
    try:
        with _sigterm_as_interrupt():
            pending = [name for name in need if not os.environ.get(ENV_URLS[name])]
            docker = bool(pending) and docker_available()
            if pending and not docker:
                ensure_installed(pending)  # one apt-get run rather than one per thread
            futures = {}
            try:
                with ThreadPoolExecutor(max(len(need), 1), thread_name_prefix="compensa-start") as pool:
                    futures = {name: pool.submit(_start_service, name, workdir, docker) for name in sorted(need)}
            finally:
                for name, future in futures.items():
                    if future.done() and future.exception() is None:
                        running.by_name[name] = future.result()
            failures = {name: future.exception() for name, future in futures.items() if future.exception()}
            if failures:
                detail = "\n\n".join(f"{name}: {error}" for name, error in failures.items())
                raise HarnessError(f"could not start {', '.join(failures)}:\n{detail}") from next(iter(failures.values()))
            yield running
    finally:
        stopping = time.monotonic()
        _close_all(running.by_name.values())
        running.stop_seconds = time.monotonic() - stopping
        shutil.rmtree(workdir, ignore_errors=True)
