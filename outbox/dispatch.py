"""Dispatch after commit: the process that committed an outbox row publishes it at once.

The relay's claim transaction (claim, order check, publish, mark) then runs only for
what this missed: rows of a process that crashed between commit and publish, rows
written while the broker was down, rows written by processes with no dispatcher (the
CLI, the HTTP API). It cuts, per message, a wake-up and a whole transaction.

How it stays at-least-once and in order per saga:
- a dispatched row is committed with a lease (`dispatch_after`); the relay leaves it
  alone until the lease ends, then publishes it like any other pending row. A crash
  between commit and publish therefore delays the row by the lease, never loses it;
- rows are published in commit order, on one channel, by one task per service, and
  marked sent in batches afterwards (a lost mark only re-publishes: inboxes dedupe);
- a unit of work dispatches only when its sagas have no pending row other than the
  ones this dispatcher is already publishing (`may_dispatch`). Otherwise its rows go
  to the relay, which publishes a saga's rows in id order, behind the older ones;
- a failed publish puts the dispatcher out of use for `cooldown` (everything goes to
  the relay meanwhile) and releases the leases of every row it held, for the relay. A
  unit of work that was granted a lease before the failure and commits after it is not
  published here either (it might overtake a released row): its rows are released
  too, and the relay publishes all of them in id order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta

import structlog
from sqlalchemy import bindparam, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts.clock import Clock
from outbox.ports import OutgoingMessage, Publisher
from outbox.tables import RESENDING_SERVICES, tables_for

log = structlog.get_logger("compensa.dispatch")

_NOTIFY = text("SELECT pg_notify('compensa_outbox', :service)")


class Dispatcher:
    """Publish one service's committed outbox rows right after their commit."""

    def __init__(
        self,
        engine: AsyncEngine,
        service: str,
        publisher: Publisher,
        clock: Clock,
        *,
        lease: timedelta = timedelta(seconds=10),
        cooldown_seconds: float = 5.0,
        mark_every_seconds: float = 0.05,
        on_published: Callable[[Sequence[OutgoingMessage]], None] | None = None,
    ) -> None:
        if service in RESENDING_SERVICES:
            # Marks go by message id, which is unique only in the other outboxes.
            raise ValueError(f"the {service} outbox re-sends message ids; its rows go through the relay")
        self.engine = engine
        self.service = service
        self.publisher = publisher
        self.clock = clock
        self.lease = lease
        self.cooldown_seconds = cooldown_seconds
        self.mark_every_seconds = mark_every_seconds
        self.on_published = on_published
        # On PostgreSQL a mark is one UPDATE outside any transaction: no BEGIN and COMMIT
        # round trips. SQLite takes its write lock at BEGIN (infra.db), so it keeps one.
        self._marks_engine = (
            engine.execution_options(isolation_level="AUTOCOMMIT") if engine.dialect.name == "postgresql" else engine
        )
        outbox = tables_for(service).outbox
        unsent = (outbox.c.message_id.in_(bindparam("ids", expanding=True)), outbox.c.sent_at.is_(None))
        self._mark_sent = update(outbox).where(*unsent).values(sent_at=bindparam("now"))
        self._release = update(outbox).where(*unsent).values(dispatch_after=None)
        #: Correlation id -> message ids submitted here and not yet marked sent.
        self._unmarked: dict[str, set[str]] = {}
        self._to_publish: list[OutgoingMessage] = []
        self._to_mark: list[OutgoingMessage] = []
        self._publish_wakeup = asyncio.Event()
        self._mark_wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        #: The batch being published now (unconfirmed).
        self._publishing: list[OutgoingMessage] = []
        #: Lease releases running in the background (kept so they are not collected).
        self._releases: set[asyncio.Task[None]] = set()
        self._out_of_use_until = -float("inf")
        self._closing = False
        self.published = 0
        #: Publishes that failed so far; a unit of work's grant is valid only while this is unchanged.
        self.failed_batches = 0

    # ---------------------------------------------------------------- units of work

    @property
    def in_use(self) -> bool:
        return not self._closing and time.monotonic() >= self._out_of_use_until

    def lease_until(self, now: datetime) -> datetime:
        return now + self.lease

    def may_dispatch(self, pending: Iterable[tuple[str, str]]) -> int | None:
        """A grant to publish rows of these sagas after commit, or None: given their
        pending rows (correlation id, message id) as the unit of work read them, only if
        each one is already on its way through this dispatcher (so it leaves first).

        The grant is handed back to `submit`; a publish that fails in between voids it.
        """
        if self.in_use and all(message_id in self._unmarked.get(saga, ()) for saga, message_id in pending):
            return self.failed_batches
        return None

    def submit(self, messages: Sequence[OutgoingMessage], grant: int) -> None:
        """Publish committed rows (leased under `grant`), in this order, soon."""
        if not messages:
            return
        if grant != self.failed_batches or self._closing:
            # A publish failed since the grant (rows it released may be older than
            # these), or the dispatcher is stopping: the relay takes these, in id order.
            self._release_soon(list(messages))
            return
        for message in messages:
            self._unmarked.setdefault(message.correlation_id, set()).add(message.message_id)
        self._to_publish.extend(messages)
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._publish_loop(), name=f"dispatch:{self.service}"),
                asyncio.create_task(self._mark_loop(), name=f"dispatch-marks:{self.service}"),
            ]
            for task in self._tasks:
                task.add_done_callback(self._loop_ended)
        self._publish_wakeup.set()

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        """A loop that died (not stopped) leaves everything to the relay from now on."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("dispatch.loop_died", service=self.service, error=repr(task.exception()))
        self._out_of_use_until = float("inf")
        self.failed_batches += 1
        held = [*self._publishing, *self._to_publish, *self._to_mark]
        self._publishing, self._to_publish, self._to_mark = [], [], []
        self._forget(held)
        self._release_soon(held)

    # ---------------------------------------------------------------- the two loops

    async def _publish_loop(self) -> None:
        while True:
            await self._publish_wakeup.wait()
            self._publish_wakeup.clear()
            while self._to_publish:
                batch, self._to_publish = self._to_publish, []
                self._publishing = batch
                await self._publish(batch)
                self._publishing = []

    async def _publish(self, batch: list[OutgoingMessage]) -> None:
        try:
            await self.publisher.publish_batch(batch)
        except Exception as exc:  # noqa: BLE001 - the relay takes these rows once their lease ends
            # Before any await: a unit of work committing meanwhile must see its grant void.
            self.failed_batches += 1
            self._out_of_use_until = time.monotonic() + self.cooldown_seconds
            log.warning(
                "dispatch.publish_failed",
                service=self.service,
                count=len(batch),
                error=repr(exc),
                relay_after_seconds=self.lease.total_seconds(),
            )
            # Whatever is queued behind them must not overtake them: the relay takes it all,
            # at once if their leases can be released, else when the leases end.
            batch, self._to_publish = batch + self._to_publish, []
            self._forget(batch)
            await self._release_leases(batch)
            return
        self.published += len(batch)
        if self.on_published is not None:
            self.on_published(batch)
        self._to_mark.extend(batch)
        self._mark_wakeup.set()

    async def _mark_loop(self) -> None:
        while True:
            await self._mark_wakeup.wait()
            if not self._closing:
                # Gather the marks of the commits around this one into one statement:
                # a mark that waits costs nothing (this process knows the row is sent).
                await asyncio.sleep(self.mark_every_seconds)
            self._mark_wakeup.clear()
            while self._to_mark:
                batch, self._to_mark = self._to_mark, []
                await self._mark(batch)

    async def _mark(self, batch: list[OutgoingMessage]) -> None:
        try:
            async with self._marks_engine.begin() as connection:
                await connection.execute(self._mark_sent, {"ids": [m.message_id for m in batch], "now": self.clock.now()})
        except Exception as exc:  # noqa: BLE001 - unmarked rows are published again by the relay: duplicates, not losses
            log.warning("dispatch.mark_failed", service=self.service, count=len(batch), error=repr(exc))
        self._forget(batch)

    def _release_soon(self, batch: list[OutgoingMessage]) -> None:
        if batch:
            task = asyncio.create_task(self._release_leases(batch), name=f"dispatch-release:{self.service}")
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)

    async def _release_leases(self, batch: list[OutgoingMessage]) -> None:
        try:
            async with self.engine.begin() as connection:
                await connection.execute(self._release, {"ids": [m.message_id for m in batch]})
                if connection.dialect.name == "postgresql":
                    # Wake the relays as an insert would (the trigger fires on INSERT only).
                    await connection.execute(_NOTIFY, {"service": self.service})
        except Exception as exc:  # noqa: BLE001 - the leases then end on their own
            log.warning("dispatch.release_failed", service=self.service, count=len(batch), error=repr(exc))

    def _forget(self, batch: Iterable[OutgoingMessage]) -> None:
        for message in batch:
            ids = self._unmarked.get(message.correlation_id)
            if ids is not None:
                ids.discard(message.message_id)
                if not ids:
                    del self._unmarked[message.correlation_id]

    # ---------------------------------------------------------------- stopping

    async def close(self, timeout: float = 10.0) -> None:
        """Publish and mark what is queued (within `timeout`), then stop.

        What could not be published in time has its lease released, so the relays'
        final flush (or any relay later) takes it at once; commits that arrive after
        this are released the same way (`submit`).
        """
        self._closing = True
        deadline = time.monotonic() + timeout
        while (self._to_publish or self._to_mark or self._unmarked) and time.monotonic() < deadline and self._tasks:
            self._publish_wakeup.set()
            self._mark_wakeup.set()
            await asyncio.sleep(0.01)  # a bounded wait at shutdown for the two loops to drain
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        unconfirmed = [*self._publishing, *self._to_publish]
        self._publishing, self._to_publish = [], []
        self._forget(unconfirmed)
        if unconfirmed:
            await self._release_leases(unconfirmed)
        if self._releases:
            await asyncio.wait(set(self._releases), timeout=max(0.5, deadline - time.monotonic()))
