"""Helpers for the dead-letter archive and operator CLI tests on the real servers.

- ``compensa(env, *args)``: run the console script as an operator would, without
  blocking the event loop (consumers in the test keep running meanwhile);
- ``stack_env``: the environment pointing the CLI at the test database and broker;
- ``publish_dead_letter``: put a message into `<queue>.dlq` exactly as the consumer
  pipeline dead-letters it (headers included);
- ``purge``, ``archived``: empty queues; read the archive.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts import Message, encode
from infra import topology as t
from infra.dlq.tables import dead_letters

COMPENSA = shutil.which("compensa", path=str(Path(sys.executable).parent)) or "compensa"


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    @property
    def error_lines(self) -> list[str]:
        return self.stderr.strip().splitlines()


def stack_env(engine: AsyncEngine, amqp_url: str | None = None, **extra: str) -> dict[str, str]:
    """The process environment minus every COMPENSA_* variable, plus the test stack's URLs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPENSA_")}
    env["COMPENSA_DATABASE_URL"] = engine.url.render_as_string(hide_password=False)
    if amqp_url:
        env["COMPENSA_AMQP_URL"] = amqp_url
    env["COMPENSA_LOG_LEVEL"] = "WARNING"
    env["COLUMNS"] = "200"
    env.update(extra)
    return env


async def compensa(env: dict[str, str], *args: str, timeout: float = 60) -> Run:
    process = await asyncio.create_subprocess_exec(
        COMPENSA, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return Run(process.returncode, stdout.decode(), stderr.decode())


def assert_one_line_error(run: Run, *fragments: str) -> str:
    """Exit 1, one `error:` line on stderr naming every fragment, no traceback anywhere."""
    assert run.returncode == 1, (run.returncode, run.stdout, run.stderr)
    assert "Traceback" not in run.stdout + run.stderr
    assert len(run.error_lines) == 1 and run.error_lines[0].startswith("error: "), run.stderr
    for fragment in fragments:
        assert fragment in run.error_lines[0], (fragment, run.error_lines[0])
    return run.error_lines[0]


def dead_letter_headers(
    queue: t.QueueSpec, message_type: str, *, reason_class: str = "handler_error", reason: str = "RuntimeError: boom",
    saga_id: str | None = None, attempts: int = 1, failed_at: datetime | None = None,
) -> dict[str, Any]:
    stamp = (failed_at or datetime.now(UTC)).isoformat()
    headers: dict[str, Any] = {
        t.H_REASON_CLASS: reason_class, t.H_REASON: reason, t.H_ATTEMPT: attempts,
        t.H_ORIGINAL_EXCHANGE: queue.exchange.name, t.H_ORIGINAL_ROUTING_KEY: message_type,
        t.H_ORIGINAL_QUEUE: queue.name, t.H_FIRST_FAILURE: stamp, t.H_LAST_FAILURE: stamp,
    }
    if saga_id:
        headers[t.H_SAGA_ID] = saga_id
    return headers


async def publish_dead_letter(
    channel: aio_pika.abc.AbstractChannel, queue: t.QueueSpec, message: Message[Any], **header_args: Any
) -> None:
    """Publish `message` into `queue`'s DLQ as the pipeline would have, confirmed."""
    headers = dead_letter_headers(queue, message.type, saga_id=message.correlation_id, **header_args)
    await channel.default_exchange.publish(
        aio_pika.Message(
            encode(message.envelope), headers=headers, message_id=str(message.message_id),
            correlation_id=message.correlation_id, type=message.type, content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        ),
        routing_key=queue.dlq,
    )


async def purge(connection: aio_pika.abc.AbstractConnection, *names: str) -> None:
    channel = await connection.channel()
    try:
        for name in names:
            queue = await channel.get_queue(name, ensure=True)
            await queue.purge()
    finally:
        await channel.close()


async def archived(engine: AsyncEngine, *where: Any) -> list[Any]:
    async with engine.connect() as connection:
        return list((await connection.execute(select(dead_letters).where(*where).order_by(dead_letters.c.id))).all())
