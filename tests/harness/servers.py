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

Use :func:`local_servers` as a context manager, or run ``python -m tests.harness.servers``
to keep a set of servers running for a shell session or a benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import logging
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aio_pika

from infra.settings import derive_management_url

log = logging.getLogger(__name__)

POSTGRES, RABBITMQ, REDIS = "postgres", "rabbitmq", "redis"
SERVICES = frozenset({POSTGRES, RABBITMQ, REDIS})
ENV_URLS = {
    POSTGRES: "COMPENSA_TEST_DATABASE_URL",
    RABBITMQ: "COMPENSA_TEST_AMQP_URL",
    REDIS: "COMPENSA_TEST_REDIS_URL",
}
# The application's own settings, printed too by ``python -m`` so that a shell can run it.
APP_ENV_URLS = {
    POSTGRES: "COMPENSA_DATABASE_URL",
    RABBITMQ: "COMPENSA_AMQP_URL",
    REDIS: "COMPENSA_REDIS_URL",
}
#: RabbitMQ's management API (HTTP), for the tests and for the application.
MANAGEMENT_ENV_URL = "COMPENSA_TEST_AMQP_MANAGEMENT_URL"
APP_MANAGEMENT_ENV_URL = "COMPENSA_AMQP_MANAGEMENT_URL"
DEBIAN_PACKAGES = {POSTGRES: "postgresql", RABBITMQ: "rabbitmq-server", REDIS: "redis-server"}
DOCKER_IMAGES = {POSTGRES: "postgres:15-alpine", RABBITMQ: "rabbitmq:3.13-management-alpine", REDIS: "redis:7-alpine"}

RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
#: Queue statistics every second, kept at one-second granularity, instead of every 5 s:
#: `compensa health` judges a queue wedged from them, and the tests wait for that.
RABBITMQ_STATS_CONF = (
    "collect_statistics_interval = 1000\n"
    "management.sample_retention_policies.global.minute = 1\n"
    "management.sample_retention_policies.basic.minute = 1\n"
    "management.sample_retention_policies.detailed.10 = 1\n"
)


class HarnessError(RuntimeError):
    """A server could not be installed, started or stopped."""


class NotControllable(HarnessError):
    """The server was not started by this harness, so it cannot be stopped on demand."""


# --------------------------------------------------------------------------- helpers

_ports_lock = threading.Lock()
_ports_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, never handed out twice by this process."""
    with _ports_lock:
        while True:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            if port not in _ports_handed_out:
                _ports_handed_out.add(port)
                return port


def _is_root() -> bool:
    return os.geteuid() == 0


def _tail(paths: Sequence[Path], lines: int = 40) -> str:
    """The last lines of each server log, for error messages."""
    parts = []
    for path in paths:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        parts.append(f"--- {path} ---\n" + "\n".join(text.splitlines()[-lines:]))
    return "\n".join(parts) or "(no server log)"


def _run(
    cmd: Sequence[str | Path],
    *,
    what: str,
    logs: Sequence[Path] = (),
    env: dict[str, str] | None = None,
    timeout: float = START_TIMEOUT,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a setup command; with ``check``, raise HarnessError carrying its output."""
    argv = [str(part) for part in cmd]
    proc = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=timeout
    )
    if check and proc.returncode != 0:
        output = (proc.stdout + proc.stderr).strip()
        raise HarnessError(
            f"{what} failed (exit {proc.returncode}): {' '.join(argv)}\n{output}\n{_tail(logs)}"
        )
    return proc


def _wait_for(
    ready: Callable[[], bool],
    *,
    what: str,
    alive: Callable[[], bool] = lambda: True,
    logs: Sequence[Path] = (),
    timeout: float = START_TIMEOUT,
    interval: float = 0.1,
) -> None:
    """Poll ``ready`` until it holds; fail early if the server dies, with its log tail."""
    deadline = time.monotonic() + timeout
    while not ready():
        if not alive():
            raise HarnessError(f"{what} exited during startup\n{_tail(logs)}")
        if time.monotonic() > deadline:
            raise HarnessError(f"{what} not ready after {timeout:.0f}s\n{_tail(logs)}")
        time.sleep(interval)


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def _redis_ping(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _amqp_ready(url: str) -> bool:
    """A full AMQP login: the port opens a moment before the broker accepts connections."""

    async def probe() -> None:
        connection = await aio_pika.connect(url, timeout=5)
        await connection.close()

    try:
        asyncio.run(probe())
    except Exception:
        return False
    return True


def _management_ready(url: str) -> bool:
    """The management API answers an authenticated request (it starts after AMQP)."""
    from urllib.parse import unquote, urlsplit

    import httpx

    parts = urlsplit(url)
    auth = (unquote(parts.username or "guest"), unquote(parts.password or "guest"))
    try:
        # Credentials as a header: httpx logs request URLs.
        answer = httpx.get(f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/api/overview", auth=auth, timeout=2)
    except httpx.HTTPError:
        return False
    return answer.status_code == 200


def _terminate_group(proc: subprocess.Popen[bytes], what: str, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM a server's process group, SIGKILL it if it outlives ``timeout``."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s ignored SIGTERM for %.0fs; killing it", what, timeout)
    # Helpers left in the group (erl_child_setup, inet_gethost) go with the server.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# ------------------------------------------------------------------ Debian packages


def _postgres_bin() -> Path | None:
    """The newest PostgreSQL server's bin dir in Debian's versioned layout."""

    def version(initdb: str) -> tuple[int, ...]:
        return tuple(int(part) for part in Path(initdb).parts[-3].split(".") if part.isdigit())

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)
    return Path(found[-1]).parent if found else None


def _redis_bin() -> str | None:
    return shutil.which("redis-server") or shutil.which("redis-server", path="/usr/bin:/usr/sbin")


def _installed(service: str) -> bool:
    if service == POSTGRES:
        return _postgres_bin() is not None
    if service == RABBITMQ:
        return RABBITMQ_SERVER.exists() and shutil.which("epmd") is not None
    return _redis_bin() is not None


_install_lock = threading.Lock()


@contextlib.contextmanager
def _services_not_autostarted(sudo: list[str]) -> Iterator[None]:
    """Keep package scripts from starting the system's own servers while installing.

    Without an init system those starts fail (failing the install), and the harness runs
    its own servers anyway; a ``policy-rc.d`` answering 101 makes ``invoke-rc.d`` skip them.
    """
    if POLICY_RC_D.exists():
        yield
        return
    _run(
        [*sudo, "sh", "-c", f"printf '#!/bin/sh\\nexit 101\\n' > {POLICY_RC_D} && chmod 755 {POLICY_RC_D}"],
        what="creating policy-rc.d",
    )
    try:
        yield
    finally:
        _run([*sudo, "rm", "-f", POLICY_RC_D], what="removing policy-rc.d", check=False)


def ensure_installed(services: Iterable[str]) -> None:
    """Install the Debian packages of the services whose binaries are missing."""
    services = sorted(set(services))
    with _install_lock:
        missing = [DEBIAN_PACKAGES[name] for name in services if not _installed(name)]
        if not missing:
            return
        if shutil.which("apt-get") is None:
            raise HarnessError(
                f"{', '.join(missing)} not installed and no apt-get here: install them, or set "
                + ", ".join(ENV_URLS[name] for name in services)
            )
        if _is_root():
            sudo: list[str] = []
        elif shutil.which("sudo"):
            sudo = ["sudo", "-n"]
        else:
            raise HarnessError(f"{', '.join(missing)} not installed; installing needs root or sudo")
        log.warning("installing Debian packages: %s", " ".join(missing))
        install = [
            *sudo, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-q",
            "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold",
            *missing,
        ]
        with _services_not_autostarted(sudo):
            result = _run(install, what="apt-get install", timeout=1800, check=False)
            if result.returncode != 0:
                _run([*sudo, "apt-get", "update", "-q"], what="apt-get update", timeout=600)
                result = _run(install, what="apt-get install", timeout=1800, check=False)
        still_missing = [name for name in services if not _installed(name)]
        if still_missing:
            raise HarnessError(
                f"apt-get install {' '.join(missing)} did not provide {', '.join(still_missing)}:\n"
                + (result.stdout + result.stderr)[-4000:]
            )


# --------------------------------------------------------------------------- servers


class Server:
    """A server the session uses: its URL, where it came from, and how to release it.

    Only servers the harness started from local binaries are ``controllable``: tests can
    ``stop()`` and ``start()`` them again (on the same port) to exercise outages.
    """

    controllable = False

    def __init__(self, name: str, origin: str, url: str = "") -> None:
        self.name = name
        self.origin = origin
        self.url = url
        #: RabbitMQ only: its management API, ``http://user:password@host:port/``.
        self.management_url = ""
        self.startup_seconds = 0.0

    @property
    def running(self) -> bool:
        return True

    def _not_controllable(self) -> NotControllable:
        return NotControllable(
            f"{self.name} at {self.url} comes from {self.origin}; only a server the harness "
            "started from local binaries can be stopped and restarted"
        )

    def stop(self) -> None:
        raise self._not_controllable()

    def start(self) -> None:
        raise self._not_controllable()

    def close(self) -> None:
        """Release the server at the end of the session."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.origin} {self.url}>"


class DockerServer(Server):
    """A testcontainers container, stopped and removed at the end of the session."""

    def __init__(self, name: str, container: object, url: str) -> None:
        super().__init__(name, "docker", url)
        self._container = container

    def close(self) -> None:
        self._container.stop()  # type: ignore[attr-defined]


class LocalServer(Server):
    """A server run from the machine's binaries inside the session's temp dir."""

    controllable = True

    def __init__(self, name: str, workdir: Path) -> None:
        super().__init__(name, "local")
        self.dir = workdir / name
        self.port = free_port()
        self._running = False

    @property
    def running(self) -> bool:
        return self._running

    def boot(self) -> None:
        """First start: prepare the data directory, then start."""
        self.dir.mkdir()
        self.start()

    def close(self) -> None:
        if self._running:
            self.stop()


class LocalPostgres(LocalServer):
    """PostgreSQL with trust auth on 127.0.0.1, a private data dir and its socket beside it.

    ``initdb`` refuses to run as root, so as root the server tools run as ``postgres``.
    The postmaster runs in the foreground as our child, not daemonised by ``pg_ctl``, so
    that it is reaped even on machines whose PID 1 reaps nothing. Durability settings stay
    at their defaults so that crash tests see real commits.
    """

    DATABASE = "compensa"

    def __init__(self, workdir: Path) -> None:
        super().__init__(POSTGRES, workdir)
        bin_dir = _postgres_bin()
        if bin_dir is None:
            raise HarnessError("PostgreSQL binaries not found under /usr/lib/postgresql")
        self._bin = bin_dir
        self._data = self.dir / "data"
        self._log = self.dir / "postgres.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self.url = f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{self.DATABASE}"

    def _tool(self, name: str, *args: str | Path) -> list[str | Path]:
        cmd: list[str | Path] = [self._bin / name, *args]
        return ["runuser", "-u", "postgres", "--", *cmd] if _is_root() else cmd

    def boot(self) -> None:
        self.dir.mkdir(mode=0o700)
        if _is_root():
            shutil.chown(self.dir, "postgres", "postgres")
        _run(
            self._tool(
                "initdb", "-D", self._data, "-U", "postgres", "--auth=trust",
                "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions",
            ),
            what="initdb",
        )
        with (self._data / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# compensa test harness\n"
                "listen_addresses = '127.0.0.1'\n"
                f"port = {self.port}\n"
                f"unix_socket_directories = '{self.dir}'\n"
                "max_connections = 200\n"
                "shared_buffers = 128MB\n"
                "fsync = on\n"
                "synchronous_commit = on\n"
            )
        self.start()
        _run(
            [self._bin / "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
             self.DATABASE],
            what="createdb",
            logs=[self._log],
        )

    def _accepting(self) -> bool:
        ready = [self._bin / "pg_isready", "-q", "-h", "127.0.0.1", "-p", str(self.port)]
        return _run(ready, what="pg_isready", check=False).returncode == 0

    def start(self) -> None:
        if self._running:
            return
        with self._log.open("ab") as server_log:
            self._proc = subprocess.Popen(
                [str(part) for part in self._tool("postgres", "-D", self._data)],
                stdin=subprocess.DEVNULL,
                stdout=server_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._running = True
        proc = self._proc
        _wait_for(
            self._accepting,
            what=f"PostgreSQL on port {self.port}",
            alive=lambda: proc.poll() is None,
            logs=[self._log],
        )

    def _signal_postmaster(self, signum: int) -> None:
        """Signal the postmaster itself: as root our child is runuser, its parent."""
        try:
            pid = int((self._data / "postmaster.pid").read_text().split()[0])
            os.kill(pid, signum)
        except (OSError, ValueError, IndexError):
            pass

    def stop(self) -> None:
        if self._proc is not None:
            self._signal_postmaster(signal.SIGINT)  # fast shutdown: roll back, checkpoint, exit
            try:
                self._proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._signal_postmaster(signal.SIGQUIT)  # immediate shutdown
            _terminate_group(self._proc, "PostgreSQL")
            self._proc = None
        self._running = False


class LocalRedis(LocalServer):
    """Redis without persistence, run as our own child so that stop() knows when it is gone."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(REDIS, workdir)
        binary = _redis_bin()
        if binary is None:
            raise HarnessError("redis-server not found")
        self._binary = binary
        self._log = self.dir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        if self._running:
            return
        self._proc = subprocess.Popen(
            [
                self._binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", str(self._log),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._running = True
        proc = self._proc
        _wait_for(
            lambda: _redis_ping("127.0.0.1", self.port),
            what=f"redis-server on port {self.port}",
            alive=lambda: proc.poll() is None,
            logs=[self._log],
            interval=0.02,
        )

    def stop(self) -> None:
        if self._proc is not None:
            _terminate_group(self._proc, "redis-server")
            self._proc = None
        self._running = False


class LocalRabbitMQ(LocalServer):
    """RabbitMQ started straight from its Erlang release, not via the /usr/sbin wrapper.

    As root the wrapper switches to the rabbitmq user and drops the environment that
    points the node at private ports and directories. The node gets its own HOME (Erlang
    cookie), its own epmd on a free port, and listens on 127.0.0.1 only. One plugin,
    rabbitmq_management, on a free port of its own: `compensa health` reads queue statistics
    from it (it costs about two seconds of start-up).
    """

    def __init__(self, workdir: Path) -> None:
        super().__init__(RABBITMQ, workdir)
        self._dist_port = free_port()
        self._epmd_port = free_port()
        self.nodename = f"compensa-test-{self.port}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self._management_port = free_port()
        self.management_url = f"http://guest:guest@127.0.0.1:{self._management_port}/"
        self._log = self.dir / "log" / "rabbit.log"
        self._console = self.dir / "console.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._epmd: subprocess.Popen[bytes] | None = None
        self._env: dict[str, str] = {}

    def boot(self) -> None:
        home = self.dir / "home"
        for path in (home, self.dir / "mnesia", self.dir / "log"):
            path.mkdir(parents=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text("".join(secrets.choice(string.ascii_uppercase) for _ in range(20)))
        cookie.chmod(0o400)
        config = self.dir / "rabbitmq.conf"
        config.write_text(
            f"loopback_users = none\nlisteners.tcp.default = 127.0.0.1:{self.port}\n"
            f"management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {self._management_port}\n"
            + RABBITMQ_STATS_CONF
        )
        plugins = self.dir / "enabled_plugins"
        plugins.write_text("[rabbitmq_management].\n")
        env_file = self.dir / "rabbitmq-env.conf"
        env_file.write_text("")
        self._env = {
            **os.environ,
            "HOME": str(home),
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self._dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_LOGS": str(self._log),
            "RABBITMQ_CONFIG_FILE": str(config),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(plugins),
            "RABBITMQ_CONF_ENV_FILE": str(env_file),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_EPMD_PORT": str(self._epmd_port),
        }
        # Our own epmd, as our child: a node that finds none starts a daemonised one.
        self._epmd = subprocess.Popen(
            ["epmd"],
            env=self._env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        epmd = self._epmd
        _wait_for(
            lambda: _port_open(self._epmd_port),
            what="epmd",
            alive=lambda: epmd.poll() is None,
            interval=0.02,
        )
        self.start()

    def start(self) -> None:
        if self._running:
            return
        with self._console.open("ab") as console:
            self._proc = subprocess.Popen(
                [RABBITMQ_SERVER],
                cwd=self.dir,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._running = True
        proc = self._proc
        _wait_for(
            lambda: _port_open(self.port) and _amqp_ready(self.url) and _management_ready(self.management_url),
            what=f"RabbitMQ node {self.nodename}",
            alive=lambda: proc.poll() is None,
            logs=[self._console, self._log],
            interval=0.2,
        )

    def stop(self) -> None:
        if self._proc is not None:
            _terminate_group(self._proc, f"RabbitMQ node {self.nodename}")
            self._proc = None
        self._running = False

    def close(self) -> None:
        super().close()
        if self._epmd is not None:
            _terminate_group(self._epmd, "epmd")
            self._epmd = None


LOCAL_SERVERS: dict[str, type[LocalServer]] = {
    POSTGRES: LocalPostgres,
    RABBITMQ: LocalRabbitMQ,
    REDIS: LocalRedis,
}


# ---------------------------------------------------------------------------- docker


def docker_available() -> bool:
    """Whether a Docker daemon answers; without one testcontainers raises DockerException."""
    try:
        import docker

        client = docker.from_env(timeout=3)
        try:
            client.ping()
        finally:
            client.close()
    except Exception:  # DockerException, connection errors, or no docker package at all
        return False
    return True


def _testcontainer(module: str, name: str) -> type:
    """testcontainers moved its modules under ``community`` in 4.x; accept either."""
    import importlib

    for path in (f"testcontainers.community.{module}", f"testcontainers.{module}"):
        with contextlib.suppress(ImportError):
            return getattr(importlib.import_module(path), name)
    raise ImportError(f"testcontainers has no {name}")


def _from_docker(name: str) -> Server | None:
    """Start the service in a container; None (so the caller falls back) when that fails."""
    container = None
    try:
        if name == POSTGRES:
            postgres = _testcontainer("postgres", "PostgresContainer")
            container = postgres(
                DOCKER_IMAGES[POSTGRES], username="postgres", password="postgres",
                dbname="compensa", driver="asyncpg",
            ).with_command("postgres -c max_connections=200")
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
            _wait_for(
                lambda: _amqp_ready(url) and _management_ready(management_url),
                what="RabbitMQ container",
                interval=0.5,
            )
    except Exception as error:
        log.warning("%s: Docker failed (%s); falling back to local binaries", name, error)
        if container is not None:
            with contextlib.suppress(Exception):
                container.stop()
        return None
    server = DockerServer(name, container, url)
    if name == RABBITMQ:
        server.management_url = management_url
    return server


# --------------------------------------------------------------------------- session


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
        server = _from_docker(name)
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
                    futures = {
                        name: pool.submit(_start_service, name, workdir, docker) for name in sorted(need)
                    }
            finally:
                for name, future in futures.items():
                    if future.done() and future.exception() is None:
                        running.by_name[name] = future.result()
            failures = {name: future.exception() for name, future in futures.items() if future.exception()}
            if failures:
                detail = "\n\n".join(f"{name}: {error}" for name, error in failures.items())
                raise HarnessError(f"could not start {', '.join(failures)}:\n{detail}") from next(
                    iter(failures.values())
                )
            yield running
    finally:
        stopping = time.monotonic()
        _close_all(running.by_name.values())
        running.stop_seconds = time.monotonic() - stopping
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Keep servers running for a shell session until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m tests.harness.servers", description=main.__doc__)
    parser.add_argument(
        "services", nargs="*", metavar="SERVICE", help=f"any of {sorted(SERVICES)}; default: all"
    )
    args = parser.parse_args(argv)
    if unknown := set(args.services) - SERVICES:
        parser.error(f"unknown services {sorted(unknown)}; choose from {sorted(SERVICES)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        with local_servers(args.services or SERVICES) as servers:
            print(servers.exports(), flush=True)
            print("# servers running; Ctrl-C or SIGTERM stops them", file=sys.stderr, flush=True)
            while True:
                signal.pause()
    except KeyboardInterrupt:
        print("# servers stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
