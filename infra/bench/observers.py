"""What watches compensa while `bench telemetry` measures it: an OTLP receiver and a scraper.

In production these are other processes (a collector, Prometheus), so they run here in
processes of their own too: the bench process places orders and its CPU counts as the
client's, which must not include receiving spans or fetching /metrics. The receiver
only answers and counts; decoding is the tests' business (tests/otlp_receiver.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from typing import Any

import httpx

#: Separate interpreters, not forks of the bench's event loop and connections.
_SPAWN = multiprocessing.get_context("spawn")
_DEADLINE_SECONDS = 30.0


class OtlpSink:
    """An OTLP/HTTP endpoint that accepts every export (an empty protobuf answer is a valid one)."""

    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                size = int(self.headers.get("Content-Length", "0"))
                self.rfile.read(size)
                sink.requests += 1
                sink.bytes += size
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    @contextlib.contextmanager
    def running(self) -> Iterator[OtlpSink]:
        thread = threading.Thread(target=self._server.serve_forever, name="otlp-sink", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()


async def scrape_every(ports: Sequence[int], seconds: float, stop: asyncio.Event, counts: dict[str, int]) -> None:
    """GET each /metrics every `seconds`, as Prometheus would, until `stop`; count what answered."""
    answered: set[int] = set()
    async with httpx.AsyncClient(timeout=5) as client:
        while not stop.is_set():
            for port in ports:
                try:
                    answer = await client.get(f"http://127.0.0.1:{port}/metrics")
                    answer.raise_for_status()
                    counts["scrapes"] += 1
                    counts["bytes"] += len(answer.content)
                    answered.add(port)
                except httpx.HTTPError:
                    # Before a process first answers it is still starting; after, a failure is one.
                    counts["failed"] += port in answered
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=seconds)


# ---------------------------------------------------------------- the processes


def _receive(conn: Connection) -> None:
    """The receiver process: send the endpoint, serve until told to stop, send the counts."""
    sink = OtlpSink()
    with sink.running():
        conn.send(sink.endpoint)
        conn.recv()
    conn.send({"requests": sink.requests, "bytes": sink.bytes})


def _scrape(conn: Connection, ports: list[int], seconds: float) -> None:
    """The scraper process: scrape until told to stop (a message on `conn`), send the counts."""

    async def main() -> dict[str, int]:
        counts = {"scrapes": 0, "bytes": 0, "failed": 0}
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_reader(conn.fileno(), stop.set)
        try:
            await scrape_every(ports, seconds, stop, counts)
        finally:
            loop.remove_reader(conn.fileno())
        return counts

    counts = asyncio.run(main())
    conn.recv()
    conn.send(counts)


class ObserverProcess:
    """One observer in a process of its own; `finish` stops it and returns what it counted."""

    def __init__(self, target: Any, *args: Any) -> None:
        self._conn, child = _SPAWN.Pipe()
        self._process = _SPAWN.Process(target=target, args=(child, *args), daemon=True)
        self._process.start()
        child.close()
        self._counts: dict[str, int] | None = None

    def receive(self) -> Any:
        if not self._conn.poll(_DEADLINE_SECONDS):
            raise TimeoutError("the observer process did not answer")
        return self._conn.recv()

    async def finish(self) -> dict[str, int]:
        """Stop it (without blocking the loop) and return its counts; again, the same counts."""
        if self._counts is None:
            self._conn.send("stop")
            self._counts = dict(await asyncio.to_thread(self.receive))
            await asyncio.to_thread(self._process.join, _DEADLINE_SECONDS)
        return self._counts


def otlp_receiver() -> tuple[ObserverProcess, str]:
    """A running OTLP receiver process and its endpoint."""
    process = ObserverProcess(_receive)
    return process, str(process.receive())


def scraper(ports: Sequence[int], seconds: float) -> ObserverProcess:
    """A process that scrapes every port's /metrics each `seconds` until finished."""
    return ObserverProcess(_scrape, list(ports), seconds)
