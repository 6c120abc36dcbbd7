"""Process control: free ports, setup commands, waiting for readiness, stopping a process group."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import aio_pika

from tests.harness.servers.base import HarnessError

log = logging.getLogger(__name__)

START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0

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


def is_root() -> bool:
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


def run_command(
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
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        output = (proc.stdout + proc.stderr).strip()
        raise HarnessError(f"{what} failed (exit {proc.returncode}): {' '.join(argv)}\n{output}\n{_tail(logs)}")
    return proc


def wait_for(
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


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def redis_ping(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def amqp_ready(url: str) -> bool:
    """A full AMQP login: the port opens a moment before the broker accepts connections."""

    async def probe() -> None:
        connection = await aio_pika.connect(url, timeout=5)
        await connection.close()

    try:
        asyncio.run(probe())
    except Exception:  # noqa: BLE001 - any failure means "not ready yet"
        return False
    return True


def management_ready(url: str) -> bool:
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


def terminate_group(proc: subprocess.Popen[bytes], what: str, timeout: float = STOP_TIMEOUT) -> None:
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
