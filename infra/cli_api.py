"""`compensa api`, `compensa producers add|list|revoke` and `compensa bench api`.

Registered on the main command line by `infra.cli`. The app itself lives in
`producers.ingest`; this module builds it from settings (the composition root's job).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from infra.cli import _engine, _print_json, app, bench_app, command, console, err, fail
from infra.cli_ops import cell, clip
from infra.settings import Settings, get_settings

producers_app = typer.Typer(help="API keys of upstream producers (HTTP ingest).", no_args_is_help=True)
app.add_typer(producers_app, name="producers")


# ---------------------------------------------------------------- the app from settings


def ingest_config(settings: Settings) -> Any:
    from producers.ingest import IngestConfig

    return IngestConfig(
        idempotency_ttl_seconds=settings.api_idempotency_ttl_seconds,
        processing_ttl_seconds=settings.api_idempotency_processing_seconds,
        rate_limit=settings.api_rate_limit,
        rate_window_seconds=settings.api_rate_limit_window_seconds,
        max_request_bytes=settings.api_max_request_bytes,
        max_batch_events=settings.api_max_batch_events,
        key_cache_seconds=settings.api_key_cache_seconds,
        require_idempotency_key=settings.api_require_idempotency_key,
    )


def build_app(settings: Settings | None = None) -> Any:
    """The ingest app on the configured database and Redis (both opened lazily, closed on shutdown)."""
    from redis.asyncio import Redis

    from infra.clock import SystemClock
    from infra.db import create_engine
    from producers.ingest import ProducerDirectory, ProducerStore, create_app
    from producers.ingest.auth import load_keys_file

    settings = settings or get_settings()
    if not settings.redis_url:
        raise ValueError("the ingest API needs Redis for idempotency keys and rate limits: set COMPENSA_REDIS_URL")
    engine = create_engine(settings.database_url)
    redis = Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.api_redis_timeout_seconds,
        socket_connect_timeout=settings.api_redis_timeout_seconds,
    )
    configured = load_keys_file(settings.api_keys_file) if settings.api_keys_file else []
    directory = ProducerDirectory(ProducerStore(engine), configured, cache_seconds=settings.api_key_cache_seconds)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await redis.aclose()
            await engine.dispose()

    return create_app(
        engine=engine, redis=redis, producers=directory, config=ingest_config(settings),
        clock=SystemClock(), lifespan=lifespan,
    )


def app_from_environment() -> Any:
    """uvicorn factory: `uvicorn --factory infra.cli_api:app_from_environment`."""
    from infra.logging import configure_logging

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    return build_app(settings)


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="Listen address (default COMPENSA_API_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default COMPENSA_API_PORT).")] = None,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Worker processes.")] = 1,
    access_log: Annotated[bool, typer.Option("--access-log/--no-access-log", help="uvicorn's per-request log line.")] = False,
) -> None:
    """Serve the HTTP ingest API (POST /v1/events, /v1/events:batch; docs at /docs)."""
    import uvicorn

    settings = get_settings()
    if not settings.redis_url:
        err.print("[red]error:[/red] the ingest API needs Redis: set COMPENSA_REDIS_URL", highlight=False)
        raise typer.Exit(1)
    uvicorn.run(
        "infra.cli_api:app_from_environment",
        factory=True,
        host=host or settings.api_host,
        port=port or settings.api_port,
        workers=workers,
        access_log=access_log,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
    )


# ---------------------------------------------------------------- producers


def _split_types(types: str) -> list[str]:
    return [t for t in (part.strip() for part in types.split(",")) if t]


@producers_app.command("add")
@command
async def producers_add(
    name: Annotated[str, typer.Argument(help="Producer name, written into every envelope it publishes.")],
    types: Annotated[str, typer.Option("--types", help="Comma-separated event types it may publish.")],
    rate_limit: Annotated[int | None, typer.Option(min=1, help="Requests per window (default COMPENSA_API_RATE_LIMIT).")] = None,
    file: Annotated[Path | None, typer.Option("--file", help="Append the hashed key to this JSON keys file instead of the database.")] = None,
) -> None:
    """Create an API key for a producer; the key is printed once and never stored."""
    from infra.clock import SystemClock
    from producers.ingest import ProducerStore, generate_key
    from producers.ingest.auth import append_to_keys_file

    key, record = generate_key(name, _split_types(types), rate_limit=rate_limit, now=SystemClock().now())
    if file is not None:
        append_to_keys_file(file, record)
        where = f"{file} (set COMPENSA_API_KEYS_FILE={file})"
    else:
        engine = _engine()
        try:
            await ProducerStore(engine).add(record)
        finally:
            await engine.dispose()
        where = "the database"
    err.print(cell(
        f"producer {record.name!r} key {record.key_id} may publish {', '.join(record.allowed_types)}; stored hashed in {where}."
    ))
    err.print("The key below is shown once: store it in the producer's secret store now.", highlight=False, markup=False)
    sys.stdout.write(key + "\n")


@producers_app.command("list")
@command
async def producers_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List API keys (never the secrets): producer, key id, allowed types, state."""
    from producers.ingest import ProducerStore
    from producers.ingest.auth import load_keys_file

    settings = get_settings()
    engine = _engine()
    try:
        records = [("database", r) for r in await ProducerStore(engine).list()]
    finally:
        await engine.dispose()
    if settings.api_keys_file and settings.api_keys_file.exists():
        records += [(str(settings.api_keys_file), r) for r in load_keys_file(settings.api_keys_file)]
    rows = [
        {
            "name": r.name, "key_id": r.key_id, "types": list(r.allowed_types), "rate_limit": r.rate_limit,
            "created_at": r.created_at, "revoked_at": r.revoked_at, "source": source,
        }
        for source, r in records
    ]
    if as_json:
        _print_json(rows)
        return
    table = Table("producer", "key id", "types", "rate limit", "created", "state", "source")
    table.columns[1].no_wrap, table.columns[1].overflow = True, "fold"  # `producers revoke` needs the whole key id
    for row in rows:
        state = f"revoked {row['revoked_at']}" if row["revoked_at"] else "active"
        table.add_row(
            cell(row["name"]), cell(row["key_id"]), cell(", ".join(row["types"])), str(row["rate_limit"] or "default"),
            cell(row["created_at"] or ""), cell(state), cell(row["source"]),
        )
    console.print(table)


@producers_app.command("revoke")
@command
async def producers_revoke(
    name_or_key_id: Annotated[str, typer.Argument(help="A key id (one key) or a producer name (all its keys).")],
) -> None:
    """Revoke API keys; requests with them get 401 (within COMPENSA_API_KEY_CACHE_SECONDS)."""
    from infra.clock import SystemClock
    from producers.ingest import ProducerStore

    engine = _engine()
    try:
        count = await ProducerStore(engine).revoke(name_or_key_id, SystemClock().now())
    finally:
        await engine.dispose()
    if count == 0:
        fail(f"no active key with id or producer name {clip(name_or_key_id)} (`compensa producers list`; keys in a keys file are removed by editing it)")
    console.print(cell(f"revoked {count} key(s) of {name_or_key_id!r}"))


# ---------------------------------------------------------------- benchmark


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def _closed_loop(clients: int, seconds: float, one: Callable[[int, int], Awaitable[None]]) -> dict[str, float]:
    """`clients` loops each calling `one(client, n)` back to back for `seconds`; rate and latency."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def loop(client: int) -> None:
        n = 0
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await one(client, n)
            latencies.append(time.perf_counter() - started)
            n += 1

    started = time.perf_counter()
    await asyncio.gather(*(loop(c) for c in range(clients)))
    elapsed = time.perf_counter() - started
    return {
        "per_s": len(latencies) / elapsed,
        "p50_ms": _pct(latencies, 50) * 1000,
        "p99_ms": _pct(latencies, 99) * 1000,
        "mean_ms": statistics.fmean(latencies) * 1000 if latencies else float("nan"),
        "count": float(len(latencies)),
    }


class _KeepAlive:
    """A minimal HTTP/1.1 keep-alive client: one connection, one request at a time.

    The benchmark's clients share the machine with the server; httpx costs several
    times more CPU per request than the server's own work, so it would measure itself.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode() + body
        )
        status_and_headers = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(status_and_headers[0].split()[1])
        length = next(int(h.split(":", 1)[1]) for h in status_and_headers if h.lower().startswith("content-length:"))
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bench_event(n: int) -> Any:
    from contracts import Money, OrderCreated, OrderLine

    return OrderCreated(
        order_id=f"bench-{n}", customer_id="c-bench", lines=(OrderLine(sku="SKU-1", quantity=2, unit_price=1500),),
        total=Money(amount=3000, currency="EUR"), payment_token="tok_ok_bench",
    )


async def api_rate(settings: Settings, clients_levels: list[int], seconds: float, workers: int) -> list[dict[str, Any]]:
    """Accepted events/s through `compensa api` (keyed requests) vs bare outbox inserts, per level."""
    import httpx
    from sqlalchemy import insert, text

    from contracts import new_message
    from infra.clock import SystemClock
    from infra.db import create_engine
    from infra.schema import upgrade
    from outbox.tables import tables_for
    from outbox.uow import outbox_row
    from producers.ingest import ProducerStore, generate_key

    engine = create_engine(settings.database_url, pool_size=max(clients_levels) + 5)
    outbox = tables_for("ingest").outbox
    clock = SystemClock()
    port = _free_port()
    executable = shutil.which("compensa") or str(Path(sys.executable).with_name("compensa"))
    server: subprocess.Popen[bytes] | None = None
    try:
        await upgrade(engine)
        async with engine.begin() as connection:
            await connection.execute(text("TRUNCATE ingest_outbox"))
        key, record = generate_key(f"bench-{uuid.uuid4().hex[:6]}", ["order.created"], rate_limit=10**9, now=clock.now())
        await ProducerStore(engine).add(record)
        env = {**os.environ, "COMPENSA_DATABASE_URL": settings.database_url, "COMPENSA_REDIS_URL": settings.redis_url or ""}
        server = subprocess.Popen(
            [executable, "api", "--port", str(port), "--workers", str(workers)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, timeout=30, limits=httpx.Limits(max_connections=max(clients_levels))) as http:
            for _ in range(300):
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get("/v1/contracts")).status_code == 200:
                        break
                if server.poll() is not None:
                    raise RuntimeError(f"`compensa api` exited with {server.returncode}")
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError("`compensa api` did not answer within 30 s")
            body_template = _bench_event(0).model_dump(mode="json")
            headers = {"X-API-Key": key, "Content-Type": "application/json"}

            # Fresh connections per level: uvicorn closes idle keep-alive connections after 5 s.
            connections: list[_KeepAlive] = []

            async def through_api(client: int, n: int) -> None:
                body = {"type": "order.created", "correlation_id": f"bench-{client}-{n}", "payload": body_template}
                status, answer = await connections[client].post(
                    "/v1/events", json.dumps(body).encode(), {**headers, "Idempotency-Key": uuid.uuid4().hex}
                )
                if status != 202:
                    raise RuntimeError(f"API answered {status}: {answer[:200]!r}")

            message = new_message(_bench_event(0), correlation_id="bench", producer="bench")

            async def bare_insert(client: int, n: int) -> None:
                row = outbox_row(message, clock.now())
                row["message_id"] = str(uuid.uuid4())
                row["correlation_id"] = f"bench-{client}-{n}"
                async with engine.begin() as connection:
                    await connection.execute(insert(outbox), [row])

            async def measure_api(clients: int, duration: float) -> dict[str, float]:
                connections[:] = [_KeepAlive("127.0.0.1", port) for _ in range(clients)]
                try:
                    return await _closed_loop(clients, duration, through_api)
                finally:
                    for connection in connections:
                        await connection.close()

            results = []
            await measure_api(4, 1.0)  # warm up the server's pools and caches
            for clients in clients_levels:
                bare = await _closed_loop(clients, seconds, bare_insert)
                through = await measure_api(clients, seconds)
                results.append({"clients": clients, "bare": bare, "api": through, "ratio": through["per_s"] / bare["per_s"]})
        return results
    finally:
        if server is not None and server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
        with contextlib.suppress(Exception):
            async with engine.begin() as connection:
                await connection.execute(text("TRUNCATE ingest_outbox"))
                await connection.execute(text("DELETE FROM ingest_producers WHERE name LIKE 'bench-%'"))
        await engine.dispose()


@bench_app.command("api")
@command
async def bench_api(
    clients: Annotated[list[int], typer.Option("--clients", help="Concurrent clients (repeatable).")] = [1, 50],  # noqa: B006
    seconds: Annotated[float, typer.Option(min=1.0, help="Seconds per measurement.")] = 10.0,
    workers: Annotated[int, typer.Option(min=1, max=64, help="`compensa api` worker processes.")] = 1,
) -> None:
    """Accepted events/s through the API (with Idempotency-Keys) vs bare outbox inserts; p50/p99.

    Needs PostgreSQL and Redis (COMPENSA_DATABASE_URL, COMPENSA_REDIS_URL); empties the
    ingest outbox before and after, so point it at benchmark servers only.
    """
    settings = get_settings()
    if not settings.database_url.startswith("postgresql") or not settings.redis_url:
        fail("bench api needs COMPENSA_DATABASE_URL=postgresql+asyncpg://… and COMPENSA_REDIS_URL=redis://…")
    console.print(
        f"api benchmark: {seconds:g} s per level, `compensa api` with {workers} worker(s), keep-alive HTTP clients in this process; "
        "bare = one INSERT into ingest_outbox per transaction",
        highlight=False,
    )
    for result in await api_rate(settings, sorted(set(clients)), seconds, workers):
        bare, through = result["bare"], result["api"]
        console.print(
            f"  {result['clients']:>3} clients: api {through['per_s']:8.1f} events/s  p50 {through['p50_ms']:6.1f} ms  "
            f"p99 {through['p99_ms']:6.1f} ms | bare outbox {bare['per_s']:8.1f} inserts/s  p50 {bare['p50_ms']:6.1f} ms  "
            f"p99 {bare['p99_ms']:6.1f} ms | ratio {result['ratio']:.2f}",
            highlight=False,
        )
