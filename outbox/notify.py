"""LISTEN/NOTIFY wake-up for relays on Postgres: a hint only, polling stays the fallback."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

log = structlog.get_logger("compensa.relay")

CHANNEL = "compensa_outbox"


async def listen_for_outbox(engine: AsyncEngine, relays: Mapping[str, Any], stop: asyncio.Event) -> None:
    """Set `relay.wakeup` whenever a transaction inserted into that relay's outbox."""
    while not stop.is_set():
        try:
            async with engine.connect() as connection:
                raw = await connection.get_raw_connection()
                driver = raw.driver_connection  # the asyncpg connection

                def on_notify(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
                    relay = relays.get(payload)
                    if relay is not None:
                        relay.wakeup.set()

                await driver.add_listener(CHANNEL, on_notify)
                try:
                    await stop.wait()
                finally:
                    await driver.remove_listener(CHANNEL, on_notify)
        except Exception as exc:  # noqa: BLE001 - losing the hint only slows relays to polling
            log.warning("relay.listen_failed", error=repr(exc))
            try:
                await asyncio.wait_for(stop.wait(), timeout=2.0)
            except TimeoutError:
                pass
