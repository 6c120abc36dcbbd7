"""The relay: move committed outbox rows to the broker, at least once, in order per saga."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import structlog
from sqlalchemy import Row, bindparam, exists, func, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from contracts.clock import Clock
from outbox.ports import OutgoingMessage, Publisher
from outbox.tables import ServiceTables, tables_for

log = structlog.get_logger("compensa.relay")

_ASYNC_COMMIT = text("SET LOCAL synchronous_commit = off")


async def _wait(*events: asyncio.Event, timeout: float) -> None:
    """Return when any of the events is set, or after timeout seconds."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def _to_outgoing(row: Row[Any]) -> OutgoingMessage:
    return OutgoingMessage(
        message_id=row.message_id,
        type=row.type,
        correlation_id=row.correlation_id,
        exchange=row.exchange,
        routing_key=row.routing_key,
        body=row.body.encode(),
        headers=json.loads(row.headers or "{}"),
    )


class Relay:
    """Claim a batch, publish it with confirms, mark it sent, all inside one transaction.

    The claim holds row locks (`FOR UPDATE SKIP LOCKED` on Postgres) until the marks
    commit, so concurrent relays never publish the same row at the same time; a crash
    after the broker confirmed but before the commit re-publishes the batch later.
    That is at-least-once delivery, made safe by every consumer's inbox.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        service: str,
        publisher: Publisher,
        clock: Clock,
        *,
        batch_size: int = 200,
        poll_seconds: float = 0.5,
        retry_base_seconds: float = 0.5,
        retry_max_seconds: float = 10.0,
        rng: random.Random | None = None,
        retention: timedelta = timedelta(hours=72),
        on_published: Callable[[Sequence[OutgoingMessage]], None] | None = None,
    ) -> None:
        self.engine = engine
        self.tables: ServiceTables = tables_for(service)
        self.service = service
        self.publisher = publisher
        self.clock = clock
        self.batch_size = batch_size
        self.poll_seconds = poll_seconds
        self.retry_base_seconds = retry_base_seconds
        self.retry_max_seconds = retry_max_seconds
        self.rng = rng or random.Random()
        self.retention = retention
        self.on_published = on_published
        self.wakeup = asyncio.Event()
        self.published_total = 0
        self.last_claimed = 0
        outbox = self.tables.outbox
        older = outbox.alias("older")
        self._claim = (
            select(outbox)
            .where(
                outbox.c.sent_at.is_(None),
                # A leased row is its dispatcher's until the lease ends (outbox/dispatch.py),
                # and the rows of its saga after it wait for it.
                or_(outbox.c.dispatch_after.is_(None), outbox.c.dispatch_after <= bindparam("now")),
                ~exists().where(
                    older.c.correlation_id == outbox.c.correlation_id,
                    older.c.id < outbox.c.id,
                    older.c.sent_at.is_(None),
                    older.c.dispatch_after > bindparam("now"),
                ),
            )
            .order_by(outbox.c.id)
            .limit(batch_size)
            .with_for_update(skip_locked=True)
        )
        self._mark_sent = update(outbox).where(outbox.c.id.in_(bindparam("ids", expanding=True))).values(sent_at=bindparam("now"))
        self._first_held_elsewhere = (
            select(outbox.c.correlation_id, func.min(outbox.c.id))
            .where(
                outbox.c.sent_at.is_(None),
                outbox.c.correlation_id.in_(bindparam("sagas", expanding=True)),
                outbox.c.id.not_in(bindparam("claimed", expanding=True)),
            )
            .group_by(outbox.c.correlation_id)
        )

    async def relay_once(self) -> int:
        """Publish one batch; return how many rows were marked sent."""
        async with self.engine.connect() as connection, connection.begin():
            rows = (await connection.execute(self._claim, {"now": self.clock.now()})).all()
            if not rows:
                self.last_claimed = 0
                return 0
            claimed = len(rows)
            if connection.dialect.name == "postgresql":
                # Losing a "sent" mark in a crash only re-publishes (the inboxes
                # dedupe), so this commit need not wait for its WAL flush.
                await connection.execute(_ASYNC_COMMIT)
                # Only Postgres can have concurrent claimers; SQLite has one writer.
                rows = await self._keep_saga_order(connection, rows)
            if not rows:
                self.last_claimed = claimed
                return 0
            batch = [_to_outgoing(row) for row in rows]
            await self.publisher.publish_batch(batch)
            await connection.execute(self._mark_sent, {"ids": [row.id for row in rows], "now": self.clock.now()})
        self.last_claimed = claimed
        self.published_total += len(batch)
        if self.on_published is not None:
            self.on_published(batch)
        log.debug("relay.published", service=self.service, count=len(batch))
        return len(batch)

    async def _keep_saga_order(self, connection: AsyncConnection, rows: Sequence[Row[Any]]) -> list[Row[Any]]:
        """Keep, per saga, only the claimed rows before its first pending row held elsewhere.

        `SKIP LOCKED` can hand this relay a saga's rows with a gap: seq 4 and 6 while
        another relay holds seq 5. Publishing 6 then would overtake 5, so everything
        from the first pending row this relay did not claim onwards waits its turn.
        (Rows behind a dispatcher's lease are left out by the claim itself.)
        """
        held = await connection.execute(
            self._first_held_elsewhere,
            {"sagas": sorted({row.correlation_id for row in rows}), "claimed": [row.id for row in rows]},
        )
        first_foreign: dict[str, int] = dict(held.all())
        return [row for row in rows if row.id < first_foreign.get(row.correlation_id, row.id + 1)]

    async def drain(self, max_batches: int | None = None) -> int:
        """Publish until nothing is pending (or max_batches ran); return the count."""
        total = 0
        batches = 0
        while max_batches is None or batches < max_batches:
            published = await self.relay_once()
            batches += 1
            total += published
            if self.last_claimed < self.batch_size:
                break
        return total

    def retry_delay(self, failures: int) -> float:
        """Backoff after the n-th failure in a row: exponential, capped, jittered in [d/2, d]."""
        ceiling = min(self.retry_base_seconds * 2 ** (failures - 1), self.retry_max_seconds)
        return self.rng.uniform(ceiling / 2, ceiling)

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until stopped; wake on a NOTIFY hint, poll as the fallback.

        After a failed batch the relay waits out its backoff whatever wakes it: during a
        broker outage every outbox insert still NOTIFYs, and acting on each would retry
        once per insert. A hint that arrives meanwhile stays set, and so does one that
        arrives while a batch is being published: the flag is cleared before the claim,
        so a row committed after the claim's snapshot is never left waiting for the poll.
        """
        log.info("relay.started", service=self.service)
        failures = 0
        while not stop.is_set():
            self.wakeup.clear()
            try:
                published = await self.relay_once()
            except Exception as exc:  # noqa: BLE001 - the relay must outlive broker/db outages
                failures += 1
                delay = self.retry_delay(failures)
                log.warning(
                    "relay.batch_failed",
                    service=self.service,
                    error=repr(exc),
                    failures=failures,
                    retry_in=round(delay, 3),
                )
                await _wait(stop, timeout=delay)
                continue
            if failures:
                log.info("relay.recovered", service=self.service, failures=failures)
                failures = 0
            if published:
                continue
            await _wait(stop, self.wakeup, timeout=self.poll_seconds)
        # Flush what is left so a graceful stop leaves nothing pending.
        try:
            await self.drain(max_batches=50)
        except Exception as exc:  # noqa: BLE001
            log.warning("relay.final_flush_failed", service=self.service, error=repr(exc))
        log.info("relay.stopped", service=self.service, published=self.published_total)
