"""Prometheus: a real server from the Debian package, scraping the targets a test sets.

A test starts one with :func:`local_prometheus`, points it at the ``/metrics`` endpoints
it serves (``set_targets``: a ``file_sd_configs`` JSON file Prometheus re-reads at once),
waits until a target is scraped (``wait_until_up``) and asks what Prometheus stored
(``query``: the HTTP API's ``/api/v1/query``). Unlike the session's servers there is no
URL or Docker fallback: a test controls this one's configuration, so it always runs from
local binaries, installed with apt-get when missing (a missing binary fails, never skips).

Example::

    with local_prometheus(["127.0.0.1:9464"]) as prometheus:
        prometheus.wait_until_up("127.0.0.1:9464")
        prometheus.query('compensa_sagas_started_total{saga_type="order"}')
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from tests.harness.servers.base import PROMETHEUS, HarnessError
from tests.harness.servers.install import ensure_installed, prometheus_bin
from tests.harness.servers.process import START_TIMEOUT, free_port, terminate_group, wait_for

#: The job of targets given without one (a target's own ``job`` label wins).
DEFAULT_JOB = "compensa"

Target = str | tuple[str, Mapping[str, str]]


def _seconds(value: float) -> str:
    """A Prometheus duration: whole milliseconds."""
    return f"{max(round(value * 1000), 1)}ms"


class LocalPrometheus:
    """A Prometheus server on a free port of 127.0.0.1, in a directory of its own.

    It scrapes one job whose targets come from ``targets.json`` (file service
    discovery), evaluates the given rule files, and keeps its TSDB in the directory.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        scrape_interval: float = 1.0,
        evaluation_interval: float | None = None,
        rule_files: Sequence[Path] = (),
    ) -> None:
        binary = prometheus_bin()
        if binary is None:
            raise HarnessError("prometheus not found (Debian package `prometheus`)")
        self._binary = binary
        self.dir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.scrape_interval = scrape_interval
        self.evaluation_interval = evaluation_interval or scrape_interval
        self.rule_files = [Path(path).resolve() for path in rule_files]
        self.config_file = self.dir / "prometheus.yml"
        self.targets_file = self.dir / "targets.json"
        self._log = self.dir / "prometheus.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._http = httpx.Client(base_url=self.url, timeout=5)

    # ------------------------------------------------------------------ lifecycle

    def _config(self) -> dict[str, Any]:
        interval = _seconds(self.scrape_interval)
        return {
            "global": {
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "evaluation_interval": _seconds(self.evaluation_interval),
            },
            "rule_files": [str(path) for path in self.rule_files],
            "scrape_configs": [
                {
                    "job_name": DEFAULT_JOB,
                    # inotify picks a rewrite up at once; the refresh is the fallback.
                    "file_sd_configs": [{"files": [str(self.targets_file)], "refresh_interval": "1s"}],
                }
            ],
        }

    def start(self) -> None:
        """Write the configuration (JSON is YAML) and start; return once ``/-/ready`` answers 200."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.targets_file.exists():
            self.set_targets([])
        self.config_file.write_text(json.dumps(self._config(), indent=2))
        with self._log.open("ab") as server_log:
            self._proc = subprocess.Popen(
                [
                    self._binary,
                    f"--config.file={self.config_file}",
                    f"--storage.tsdb.path={self.dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=server_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = self._proc
        wait_for(
            self._ready,
            what=f"Prometheus on port {self.port}",
            alive=lambda: proc.poll() is None,
            logs=[self._log],
        )

    def _ready(self) -> bool:
        try:
            return self._http.get("/-/ready").status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and release the HTTP client."""
        if self._proc is not None:
            terminate_group(self._proc, "Prometheus")
            self._proc = None
        self._http.close()

    # ------------------------------------------------------------------ targets

    def set_targets(self, targets: Iterable[Target]) -> None:
        """Scrape exactly these ``host:port`` targets, each optionally with its own labels.

        The file is replaced atomically so Prometheus never reads half of it. Prometheus
        hands discovered targets to its scrapers at most every 5 s (a constant), so a
        change shows within about that: wait for it with ``wait_until_up``.
        """
        groups = []
        for target in targets:
            address, labels = (target, {}) if isinstance(target, str) else target
            groups.append({"targets": [address], "labels": dict(labels)})
        partial = self.targets_file.with_suffix(".json.partial")
        partial.write_text(json.dumps(groups))
        os.replace(partial, self.targets_file)

    def targets(self) -> list[dict[str, Any]]:
        """The active targets as ``/api/v1/targets`` reports them (``health``, ``lastError``...)."""
        return list(self._api("/api/v1/targets", {"state": "active"})["activeTargets"])

    def target(self, address: str) -> dict[str, Any] | None:
        for active in self.targets():
            if active["labels"].get("instance") == address or active["discoveredLabels"].get("__address__") == address:
                return active
        return None

    def wait_until_up(self, address: str, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        """Wait until ``address`` has been scraped successfully; return its target entry."""
        deadline = time.monotonic() + timeout
        while True:
            active = self.target(address)
            if active is not None and active["health"] == "up":
                return active
            if self._proc is None or self._proc.poll() is not None:
                raise HarnessError(f"Prometheus exited while waiting for {address}\n{self.log_tail()}")
            if time.monotonic() > deadline:
                seen = "never discovered" if active is None else f"health {active['health']}: {active['lastError']}"
                raise HarnessError(f"Prometheus target {address} not up after {timeout:.0f}s ({seen})")
            time.sleep(0.1)

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server's log, for failure messages."""
        try:
            return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no Prometheus log)"

    # ------------------------------------------------------------------ queries

    def _api(self, path: str, params: Mapping[str, str]) -> Any:
        try:
            answer = self._http.get(path, params=params)
        except httpx.HTTPError as error:
            raise HarnessError(f"Prometheus {path} failed: {error}") from error
        try:
            body = answer.json()
        except ValueError:
            raise HarnessError(f"Prometheus {path}: HTTP {answer.status_code}, not JSON: {answer.text[:500]}") from None
        if body.get("status") != "success":
            raise HarnessError(f"Prometheus {path} {dict(params)}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Evaluate an instant query now: the vector's samples, ``{"metric": {...}, "value": [t, "v"]}``.

        A malformed query raises HarnessError with Prometheus' own message.
        """
        data = self._api("/api/v1/query", {"query": promql})
        if data["resultType"] != "vector":
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def value(self, promql: str) -> float | None:
        """The single sample of an instant query as a float; None when the vector is empty."""
        result = self.query(promql)
        if not result:
            return None
        if len(result) > 1:
            raise HarnessError(f"{promql!r} returned {len(result)} series, expected one: {result}")
        return float(result[0]["value"][1])

    def wait_for_query(
        self,
        promql: str,
        until: Callable[[list[dict[str, Any]]], bool] = bool,
        timeout: float = START_TIMEOUT,
    ) -> list[dict[str, Any]]:
        """Re-run an instant query until ``until(samples)`` holds (default: any sample); return the samples."""
        deadline = time.monotonic() + timeout
        while True:
            samples = self.query(promql)
            if until(samples):
                return samples
            if time.monotonic() > deadline:
                raise HarnessError(f"{promql!r}: condition not met after {timeout:.0f}s (last result: {samples})")
            time.sleep(0.1)

    def rules(self) -> list[dict[str, Any]]:
        """The loaded rule groups with each rule's health and last error (``/api/v1/rules``)."""
        return list(self._api("/api/v1/rules", {})["groups"])

    def alerts(self) -> list[dict[str, Any]]:
        """Pending and firing alerts of the loaded rule files (``/api/v1/alerts``)."""
        return list(self._api("/api/v1/alerts", {})["alerts"])

    def __repr__(self) -> str:
        return f"<LocalPrometheus {self.url}>"


@contextlib.contextmanager
def local_prometheus(
    targets: Iterable[Target] = (),
    *,
    scrape_interval: float = 1.0,
    evaluation_interval: float | None = None,
    rule_files: Sequence[Path] = (),
) -> Iterator[LocalPrometheus]:
    """Install (if missing) and start Prometheus scraping ``targets``; stop it and remove its directory on exit."""
    ensure_installed([PROMETHEUS])
    workdir = Path(tempfile.mkdtemp(prefix="compensa-prometheus-"))
    prometheus: LocalPrometheus | None = None
    try:
        prometheus = LocalPrometheus(
            workdir, scrape_interval=scrape_interval, evaluation_interval=evaluation_interval, rule_files=rule_files
        )
        prometheus.set_targets(targets)
        prometheus.start()
        yield prometheus
    finally:
        if prometheus is not None:
            prometheus.close()
        shutil.rmtree(workdir, ignore_errors=True)


def promtool(*args: str | Path, cwd: Path | None = None, timeout: float = START_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run ``promtool`` (installed with Prometheus when missing); the caller checks its exit status."""
    ensure_installed([PROMETHEUS])
    binary = prometheus_bin("promtool")
    if binary is None:
        raise HarnessError("promtool not found (Debian package `prometheus`)")
    argv = [binary, *(str(arg) for arg in args)]
    return subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, check=False)
