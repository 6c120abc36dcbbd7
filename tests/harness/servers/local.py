"""Local servers: PostgreSQL, Redis and RabbitMQ run from the machine's binaries by the harness."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import string
import subprocess
from pathlib import Path

from tests.harness.servers.base import POSTGRES, RABBITMQ, RABBITMQ_STATS_CONF, REDIS, HarnessError, Server
from tests.harness.servers.install import RABBITMQ_SERVER, postgres_bin, redis_bin
from tests.harness.servers.process import (
    STOP_TIMEOUT,
    amqp_ready,
    free_port,
    is_root,
    management_ready,
    port_open,
    redis_ping,
    run_command,
    terminate_group,
    wait_for,
)


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
        bin_dir = postgres_bin()
        if bin_dir is None:
            raise HarnessError("PostgreSQL binaries not found under /usr/lib/postgresql")
        self._bin = bin_dir
        self._data = self.dir / "data"
        self._log = self.dir / "postgres.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self.url = f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{self.DATABASE}"

    def _tool(self, name: str, *args: str | Path) -> list[str | Path]:
        cmd: list[str | Path] = [self._bin / name, *args]
        return ["runuser", "-u", "postgres", "--", *cmd] if is_root() else cmd

    def boot(self) -> None:
        self.dir.mkdir(mode=0o700)
        if is_root():
            shutil.chown(self.dir, "postgres", "postgres")
        run_command(
            self._tool(
                "initdb",
                "-D",
                self._data,
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
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
                # Statement counts for `compensa bench saga`.
                "shared_preload_libraries = 'pg_stat_statements'\n"
            )
        self.start()
        run_command(
            [self._bin / "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", self.DATABASE],
            what="createdb",
            logs=[self._log],
        )

    def _accepting(self) -> bool:
        ready = [self._bin / "pg_isready", "-q", "-h", "127.0.0.1", "-p", str(self.port)]
        return run_command(ready, what="pg_isready", check=False).returncode == 0

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
        wait_for(
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
            terminate_group(self._proc, "PostgreSQL")
            self._proc = None
        self._running = False


class LocalRedis(LocalServer):
    """Redis without persistence, run as our own child so that stop() knows when it is gone."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(REDIS, workdir)
        binary = redis_bin()
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
                self._binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--logfile",
                str(self._log),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._running = True
        proc = self._proc
        wait_for(
            lambda: redis_ping("127.0.0.1", self.port),
            what=f"redis-server on port {self.port}",
            alive=lambda: proc.poll() is None,
            logs=[self._log],
            interval=0.02,
        )

    def stop(self) -> None:
        if self._proc is not None:
            terminate_group(self._proc, "redis-server")
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
            f"management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {self._management_port}\n" + RABBITMQ_STATS_CONF
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
        wait_for(
            lambda: port_open(self._epmd_port),
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
        wait_for(
            lambda: port_open(self.port) and amqp_ready(self.url) and management_ready(self.management_url),
            what=f"RabbitMQ node {self.nodename}",
            alive=lambda: proc.poll() is None,
            logs=[self._console, self._log],
            interval=0.2,
        )

    def stop(self) -> None:
        if self._proc is not None:
            terminate_group(self._proc, f"RabbitMQ node {self.nodename}")
            self._proc = None
        self._running = False

    def close(self) -> None:
        super().close()
        if self._epmd is not None:
            terminate_group(self._epmd, "epmd")
            self._epmd = None


LOCAL_SERVERS: dict[str, type[LocalServer]] = {
    POSTGRES: LocalPostgres,
    RABBITMQ: LocalRabbitMQ,
    REDIS: LocalRedis,
}
