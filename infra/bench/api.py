"""The HTTP ingest path: accepted events/s through `compensa api` (keyed requests, keep-alive
clients in this process) against bare outbox inserts, with p50/p99."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from infra.bench.common import closed_loop
from infra.settings import Settings


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
        port: int = s.getsockname()[1]
        return port


def _bench_event(n: int) -> Any:
    from contracts import Money, OrderCreated, OrderLine

    return OrderCreated(
        order_id=f"bench-{n}",
        customer_id="c-bench",
        lines=(OrderLine(sku="SKU-1", quantity=2, unit_price=1500),),
        total=Money(amount=3000, currency="EUR"),
        payment_token="tok_ok_bench",
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
        server = subprocess.Popen(  # noqa: ASYNC220 - returns at once; the server is polled over HTTP
            [executable, "api", "--port", str(port), "--workers", str(workers)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
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
            # Every order id new (a second start of an order is a 409), and the payload's
            # order id is the correlation id (the saga's business key).
            run = [uuid.uuid4().hex[:8]]

            async def through_api(client: int, n: int) -> None:
                order_id = f"bench-{run[0]}-{client}-{n}"
                body = {"type": "order.created", "correlation_id": order_id, "payload": {**body_template, "order_id": order_id}}
                status, answer = await connections[client].post(
                    "/v1/events", json.dumps(body).encode(), {**headers, "Idempotency-Key": uuid.uuid4().hex}
                )
                if status != 202:
                    raise RuntimeError(f"API answered {status}: {answer[:200]!r}")

            message = new_message(_bench_event(0), correlation_id="bench-0", producer="bench")

            async def bare_insert(client: int, n: int) -> None:
                row = outbox_row(message, clock.now())
                row["message_id"] = str(uuid.uuid4())
                row["correlation_id"] = f"bare-{run[0]}-{client}-{n}"  # never an order the API is sent
                async with engine.begin() as connection:
                    await connection.execute(insert(outbox), [row])

            async def measure_api(clients: int, duration: float) -> dict[str, float]:
                run[0] = uuid.uuid4().hex[:8]
                connections[:] = [_KeepAlive("127.0.0.1", port) for _ in range(clients)]
                try:
                    return await closed_loop(clients, duration, through_api)
                finally:
                    for connection in connections:
                        await connection.close()

            results = []
            await measure_api(4, 1.0)  # warm up the server's pools and caches
            for clients in clients_levels:
                bare = await closed_loop(clients, seconds, bare_insert)
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
