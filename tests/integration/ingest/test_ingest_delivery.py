"""What the API accepted reaches consumers, even when the API process dies right after 202.

The 202 is sent only after the outbox commit, so killing the process (SIGKILL, no
shutdown) cannot lose an accepted event: a relay publishes it from the outbox. A
retry of the same request against a restarted API gets the first answer, and the
consumer still sees one event.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts import decode
from tests.integration.support import (
    outbox_rows,
    relay_for,
)
from tests.support import eventually, ledger_updated

pytestmark = pytest.mark.integration

TYPES = ("ledger.updated",)


async def test_accepted_event_reaches_a_consumer(make_client, add_producer, engine, rabbit_publisher, ledger_queue):
    client = make_client(await add_producer("erp", TYPES))
    response = await client.post("/v1/events", json=ledger_updated("o-1"), headers={"Idempotency-Key": "deliver-1"})
    assert response.status_code == 202
    message_id = response.json()["message_id"]
    assert await relay_for(engine, rabbit_publisher).drain() == 1
    [delivered] = await eventually(ledger_queue, message="event delivered to the bound queue")
    message = decode(delivered.body)
    assert str(message.message_id) == message_id == delivered.message_id
    assert message.envelope.producer == "erp" and message.type == "ledger.updated" and delivered.correlation_id == "o-1"
    assert message.payload.transaction_id == "capture:o-1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def api_process(engine: AsyncEngine, redis_url: str, amqp_url: str) -> Iterator[object]:
    """``start()`` runs `compensa api` on a free port as a real process; every one is killed after the test."""
    processes: list[subprocess.Popen[bytes]] = []
    env = {
        **os.environ,
        "COMPENSA_DATABASE_URL": engine.url.render_as_string(hide_password=False),
        "COMPENSA_REDIS_URL": redis_url,
        "COMPENSA_AMQP_URL": amqp_url,
        "COMPENSA_LOG_LEVEL": "WARNING",
    }
    executable = str(Path(sys.executable).with_name("compensa"))

    async def start() -> tuple[subprocess.Popen[bytes], str]:
        port = _free_port()
        process = subprocess.Popen(  # noqa: ASYNC220 - returns at once; readiness is polled below
            [executable, "api", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        processes.append(process)
        base = f"http://127.0.0.1:{port}"

        async def healthy() -> bool:
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else "exited"
            try:
                async with httpx.AsyncClient() as http:
                    return (await http.get(f"{base}/v1/contracts")).status_code == 200
            except httpx.TransportError:
                return False

        await eventually(healthy, timeout=30, interval=0.1, message="`compensa api` serving")
        return process, base

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


async def test_api_killed_right_after_202_still_delivers_the_event_once(
    add_producer, engine, rabbit_publisher, ledger_queue, api_process
):
    key = await add_producer("erp", TYPES)
    process, base = await api_process()
    headers = {"X-API-Key": key, "Idempotency-Key": "crash-1"}
    async with httpx.AsyncClient(base_url=base) as http:
        assert (await http.get("/health")).json() == {"status": "ok"}
        response = await http.post("/v1/events", json=ledger_updated("o-crash"), headers=headers)
        process.send_signal(signal.SIGKILL)
    assert response.status_code == 202
    first = response.json()
    assert process.wait(timeout=10) == -signal.SIGKILL
    # Nothing of the dead process is needed: the event is in the outbox.
    assert [r.message_id for r in await outbox_rows(engine)] == first["message_ids"]
    assert await relay_for(engine, rabbit_publisher).drain() == 1
    [delivered] = await eventually(ledger_queue, message="event delivered after the API died")
    assert delivered.message_id == first["message_id"]

    # The client never saw the 202 (say); it retries against a restarted API.
    _restarted, base = await api_process()
    async with httpx.AsyncClient(base_url=base) as http:
        retry = await http.post("/v1/events", json=ledger_updated("o-crash"), headers=headers)
    assert retry.status_code == 202 and retry.json() == first
    # The relay is the only publisher and it published nothing (confirmed publishes
    # are complete when drain returns), so the queue still holds the one event.
    assert await relay_for(engine, rabbit_publisher).drain() == 0
    assert len(await ledger_queue()) == 1
