"""LISTEN/NOTIFY wake-up for relays on Postgres: a hint only, polling stays the fallback.

The listening connection can be lost at any time (a server restart, a failover, a cut
link). The listener notices (asyncpg's termination callback, plus a cheap periodic
query for a link that died silently), connects again with capped, jittered backoff,
LISTENs again and wakes every relay once, because rows committed while nobody listened
sent their NOTIFY into the void.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Mapping
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

log = structlog.get_logger("compensa.relay")

CHANNEL = "compensa_outbox"


class OutboxListener:
    """Set `relay.wakeup` whenever a transaction inserted into that relay's outbox.

    `relays` maps an outbox (service) name, the NOTIFY payload, to an object with a
    `wakeup` asyncio.Event. `listening` is set while LISTEN is in effect; `sessions`
    counts how many times it was established and `notifications` how many hints arrived.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        relays: Mapping[str, Any],
        *,
        check_seconds: float = 10.0,
        retry_base_seconds: float = 0.2,
        retry_max_seconds: float = 5.0,
        rng: random.Random | None = None,
    ) -> None:
        self.engine = engine
        self.relays = relays
        self.check_seconds = check_seconds
        self.retry_base_seconds = retry_base_seconds
        self.retry_max_seconds = retry_max_seconds
        self.rng = rng or random.Random()
        self.listening = asyncio.Event()
        self.sessions = 0
        self.notifications = 0

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self.notifications += 1
        relay = self.relays.get(payload)
        if relay is not None:
            relay.wakeup.set()

    def _wake_all(self) -> None:
        for relay in self.relays.values():
            relay.wakeup.set()

    def _retry_delay(self, failures: int) -> float:
        """Exponential backoff with jitter in [d/2, d], d capped at retry_max_seconds."""
        ceiling = min(self.retry_base_seconds * 2 ** (failures - 1), self.retry_max_seconds)
        return self.rng.uniform(ceiling / 2, ceiling)

    async def run(self, stop: asyncio.Event) -> None:
        """Listen until stopped, re-establishing LISTEN whenever the connection is lost."""
        failures = 0  # failed attempts to listen again since the last loss
        lost_at: float | None = None
        while not stop.is_set():
            sessions = self.sessions
            try:
                reason = await self._listen_once(stop, lost_at, failures)
            except Exception as exc:  # noqa: BLE001 - losing the hint only slows relays to polling
                reason = repr(exc)
            if self.sessions > sessions:  # it listened (and recovered, if it had been lost)
                failures, lost_at = 0, None
            elif lost_at is not None:
                failures += 1
            if stop.is_set():
                break
            if lost_at is None:
                lost_at = time.monotonic()
                log.warning("relay.listen_lost", channel=CHANNEL, error=reason)
            delay = self._retry_delay(failures + 1)
            log.debug("relay.listen_retry", failed_attempts=failures, retry_in=round(delay, 3), error=reason)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)

    async def _listen_once(self, stop: asyncio.Event, lost_at: float | None, failures: int) -> str:
        """LISTEN on one connection until it is lost (return why) or stop is set (return "")."""
        async with self.engine.connect() as connection:
            raw = await connection.get_raw_connection()
            driver = raw.driver_connection  # the asyncpg connection
            assert driver is not None, "an open connection has its driver connection"
            terminated = asyncio.Event()

            def on_terminated(_conn: Any) -> None:
                terminated.set()

            driver.add_termination_listener(on_terminated)
            reason = "listen failed"
            try:
                await driver.add_listener(CHANNEL, self._on_notify)
                self.sessions += 1
                self.listening.set()
                if lost_at is not None:
                    log.info(
                        "relay.listen_restored",
                        channel=CHANNEL,
                        down_seconds=round(time.monotonic() - lost_at, 3),
                        failed_attempts=failures,
                    )
                # Whatever was committed while nobody listened sent no hint we heard.
                self._wake_all()
                reason = await self._watch(driver, terminated, stop)
            finally:
                self.listening.clear()
                driver.remove_termination_listener(on_terminated)
                healthy = reason == "" and not driver.is_closed()
                if healthy:
                    try:
                        await asyncio.wait_for(driver.remove_listener(CHANNEL, self._on_notify), self.check_seconds)
                    except Exception:  # noqa: BLE001 - then the connection is not fit for the pool
                        healthy = False
                if not healthy:
                    # Never hand a dead or still-listening connection back to the pool. Abort
                    # it first: invalidate() alone tries a graceful close, which a silent
                    # link holds up for its whole timeout.
                    driver.terminate()
                    await connection.invalidate()
            return reason

    async def _watch(self, driver: Any, terminated: asyncio.Event, stop: asyncio.Event) -> str:
        """Wait for stop or for the connection to end; return "" on stop, else the reason."""
        stopping = asyncio.ensure_future(stop.wait())
        ended = asyncio.ensure_future(terminated.wait())
        try:
            while True:
                await asyncio.wait({stopping, ended}, timeout=self.check_seconds, return_when=asyncio.FIRST_COMPLETED)
                if stop.is_set():
                    return ""
                if terminated.is_set() or driver.is_closed():
                    return "connection terminated"
                # A link that died without a FIN never calls back: ask the server.
                try:
                    await asyncio.wait_for(driver.execute("SELECT 1"), timeout=self.check_seconds)
                except Exception as exc:  # noqa: BLE001 - any failure means this LISTEN is gone
                    return f"liveness check failed: {exc!r}"
        finally:
            stopping.cancel()
            ended.cancel()


async def listen_for_outbox(engine: AsyncEngine, relays: Mapping[str, Any], stop: asyncio.Event, **options: Any) -> None:
    """Set `relay.wakeup` whenever a transaction inserted into that relay's outbox.

    Survives losing the connection: see OutboxListener for the options.
    """
    await OutboxListener(engine, relays, **options).run(stop)
