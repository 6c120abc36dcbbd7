"""Installation: the Debian packages of the servers, installed with apt-get when missing."""

from __future__ import annotations

import contextlib
import glob
import logging
import shutil
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from tests.harness.servers.base import ENV_URLS, POSTGRES, PROMETHEUS, RABBITMQ, REDIS, HarnessError
from tests.harness.servers.process import is_root, run_command

log = logging.getLogger(__name__)

DEBIAN_PACKAGES = {
    POSTGRES: "postgresql",
    RABBITMQ: "rabbitmq-server",
    REDIS: "redis-server",
    PROMETHEUS: "prometheus",  # ships promtool too
}
RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")


def postgres_bin() -> Path | None:
    """The newest PostgreSQL server's bin dir in Debian's versioned layout."""

    def version(initdb: str) -> tuple[int, ...]:
        return tuple(int(part) for part in Path(initdb).parts[-3].split(".") if part.isdigit())

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)
    return Path(found[-1]).parent if found else None


def redis_bin() -> str | None:
    return shutil.which("redis-server") or shutil.which("redis-server", path="/usr/bin:/usr/sbin")


def prometheus_bin(tool: str = "prometheus") -> str | None:
    """``prometheus`` or ``promtool`` from the Debian package (/usr/bin)."""
    return shutil.which(tool) or shutil.which(tool, path="/usr/bin:/usr/sbin")


def _installed(service: str) -> bool:
    if service == POSTGRES:
        return postgres_bin() is not None
    if service == RABBITMQ:
        return RABBITMQ_SERVER.exists() and shutil.which("epmd") is not None
    if service == PROMETHEUS:
        return prometheus_bin() is not None and prometheus_bin("promtool") is not None
    return redis_bin() is not None


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
    run_command(
        [*sudo, "sh", "-c", f"printf '#!/bin/sh\\nexit 101\\n' > {POLICY_RC_D} && chmod 755 {POLICY_RC_D}"],
        what="creating policy-rc.d",
    )
    try:
        yield
    finally:
        run_command([*sudo, "rm", "-f", POLICY_RC_D], what="removing policy-rc.d", check=False)


def ensure_installed(services: Iterable[str]) -> None:
    """Install the Debian packages of the services whose binaries are missing."""
    services = sorted(set(services))
    with _install_lock:
        missing = [DEBIAN_PACKAGES[name] for name in services if not _installed(name)]
        if not missing:
            return
        if shutil.which("apt-get") is None:
            urls = [ENV_URLS[name] for name in services if name in ENV_URLS]
            raise HarnessError(
                f"{', '.join(missing)} not installed and no apt-get here: install "
                + ("them, or set " + ", ".join(urls) if urls else "them")
            )
        if is_root():
            sudo: list[str] = []
        elif shutil.which("sudo"):
            sudo = ["sudo", "-n"]
        else:
            raise HarnessError(f"{', '.join(missing)} not installed; installing needs root or sudo")
        log.warning("installing Debian packages: %s", " ".join(missing))
        install = [
            *sudo,
            "env",
            "DEBIAN_FRONTEND=noninteractive",
            "apt-get",
            "install",
            "-y",
            "-q",
            "-o",
            "Dpkg::Options::=--force-confdef",
            "-o",
            "Dpkg::Options::=--force-confold",
            *missing,
        ]
        with _services_not_autostarted(sudo):
            result = run_command(install, what="apt-get install", timeout=1800, check=False)
            if result.returncode != 0:
                run_command([*sudo, "apt-get", "update", "-q"], what="apt-get update", timeout=600)
                result = run_command(install, what="apt-get install", timeout=1800, check=False)
        still_missing = [name for name in services if not _installed(name)]
        if still_missing:
            raise HarnessError(
                f"apt-get install {' '.join(missing)} did not provide {', '.join(still_missing)}:\n"
                + (result.stdout + result.stderr)[-4000:]
            )
