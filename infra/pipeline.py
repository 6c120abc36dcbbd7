"""The consumer pipeline: decode → validate → inbox → handler in a unit of work → commit → ack."""

from __future__ import annotations

import asyncio
import random
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import structlog
from opentelemetry import trace
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, StatementError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts import BusinessRuleError, ContractError, Deferred, Message, TransientError, decode
from contracts.clock import Clock
from infra.db import sqlstate
from infra.telemetry import instruments
from infra.telemetry.catalogue import reason_class_label
from infra.transport.base import Delivery
from outbox.tracing import context_from
from outbox.uow import Handler, UnitOfWork

log = structlog.get_logger("compensa.consumer")
tracer = trace.get_tracer("compensa")
#: The process span of the delivery this task handles now: what settling a failure hangs under.
_PROCESSING: ContextVar[trace.Span | None] = ContextVar("compensa_processing_span", default=None)

#: Runs first in a batch's transaction with all its messages (to take locks in one order).
BatchLock = Callable[[UnitOfWork, Sequence[Message[Any]]], Awaitable[None]]

# Postgres SQLSTATEs that mean "try again": serialization failure, deadlock, lock timeout.
_RETRYABLE_SQLSTATES = {"40001", "40P01", "55P03", "57014"}
# Postgres SQLSTATEs that mean "the server is not available now": shutting down
# (57P01 admin, 57P02 crash), starting up or a standby (57P03), too many connections
# (53300). Class 08 is every connection exception.
_UNAVAILABLE_SQLSTATES = {"57P01", "57P02", "57P03", "53300"}


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    base_seconds: float = 0.5
    max_seconds: float = 60.0
    #: How long a message waits, unacknowledged, for an unavailable database (a restart)
    #: before it takes the ordinary retry path; it uses no attempt meanwhile.
    unavailable_seconds: float = 120.0

    def delay_ms(self, attempt: int) -> int:
        """Delay before attempt `attempt + 1`: exponential, capped; one delay queue each."""
        return int(min(self.base_seconds * 2 ** (attempt - 1), self.max_seconds) * 1000)

    def jittered_ms(self, attempt: int, rng: random.Random) -> int:
        """Full-range jitter in [delay/2, delay] so retries of a burst spread out."""
        delay = self.delay_ms(attempt)
        return max(1, int(delay / 2 + rng.random() * delay / 2))


def is_unavailable(exc: BaseException) -> bool:
    """Tell whether the database could not be reached or is restarting (not a bad statement)."""
    if isinstance(exc, PoolTimeoutError | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        code = sqlstate(exc) or ""
        return code in _UNAVAILABLE_SQLSTATES or code.startswith("08")
    return isinstance(exc, OSError)


def is_dead_connection(exc: BaseException) -> bool:
    """A statement failed because its pooled connection had died (a server restart, say).

    SQLAlchemy has discarded it, and the pool's other connections from before, so the
    same work on a new connection can succeed at once.
    """
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, TransientError | OperationalError | IntegrityError):
        return True
    if is_unavailable(exc):
        return True
    if isinstance(exc, DBAPIError):
        return sqlstate(exc) in _RETRYABLE_SQLSTATES
    return False


def failure_reason(exc: BaseException) -> str:
    """One line naming the failure, without the SQL statement or its bound values."""
    if isinstance(exc, StatementError) and exc.orig is not None:
        detail = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else type(exc.orig).__name__
        return f"{type(exc).__name__}: {type(exc.orig).__name__}: {detail}"[:2000]
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()[:2000]


class MessageProcessor:
    """Process deliveries of one work queue for one service, exactly once in effect."""

    def __init__(
        self,
        engine: AsyncEngine,
        service: str,
        consumer: str,
        handlers: Mapping[str, Handler],
        clock: Clock,
        *,
        retry: RetryPolicy = RetryPolicy(),
        rng: random.Random | None = None,
        uow_factory: Callable[..., UnitOfWork] = UnitOfWork,
        lock_batch: BatchLock | None = None,
        probe: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.engine = engine
        #: Raises while the database cannot take work (default: SELECT 1 on the engine).
        self.probe = probe or self._select_one
        self.lock_batch = lock_batch
        self.service = service
        self.consumer = consumer
        self.handlers = dict(handlers)
        self.clock = clock
        self.retry = retry
        self.rng = rng or random.Random()
        self.uow_factory = uow_factory
        self.processed = 0
        self.duplicates = 0
        #: Batches rolled back and replayed one message at a time (a failure, a deadlock).
        self.batch_splits = 0
        self._probe_lock = asyncio.Lock()
        #: When the current outage began, and when the last one ended (monotonic seconds).
        self._down_since: float | None = None
        self._recovered_at = -float("inf")

    async def __call__(self, delivery: Delivery, decoded: Message[Any] | None = None) -> None:
        """Process one delivery in its own transaction (`decoded` if the caller decoded it)."""
        _PROCESSING.set(None)
        with structlog.contextvars.bound_contextvars(
            queue=delivery.queue.name, message_id=delivery.message_id, attempt=delivery.attempt
        ):
            message: Message[Any] | None = decoded
            pause = 0.05
            reconnected = False
            while True:
                try:
                    if message is None:
                        message = self._decode(delivery)
                    with structlog.contextvars.bound_contextvars(saga_id=message.correlation_id, message_type=message.type):
                        await self._process(delivery, message)
                except (ContractError, BusinessRuleError) as exc:
                    with self._settle_span(delivery, message, exc):
                        await self._dead_letter(delivery, exc.reason_class, str(exc), message)
                except Exception as exc:  # noqa: BLE001 - classified below, never swallowed
                    if is_dead_connection(exc) and not reconnected:
                        # Run it again on a new connection. If the lost connection had
                        # committed after all, the inbox turns the rerun into a duplicate.
                        reconnected = True
                        continue
                    if is_unavailable(exc) and await self.wait_for_database(failed_at=time.monotonic()):
                        # The same delivery again, no attempt used; a pause in case the
                        # server answers probes but still refuses the work.
                        await asyncio.sleep(pause)
                        pause = min(pause * 2, 2.0)
                        continue
                    with self._settle_span(delivery, message, exc):
                        if is_transient(exc):
                            await self._retry_or_dead_letter(delivery, exc, message)
                        else:
                            await self._dead_letter(delivery, "handler_error", failure_reason(exc), message)
                return

    async def wait_for_database(self, *, failed_at: float) -> bool:
        """Wait out a database outage; True when the failure at `failed_at` was one that has ended.

        A restarting server refuses work for seconds to a minute: the message waits here,
        unacknowledged, instead of spending its attempts or going to the DLQ. False, and the
        message takes the ordinary retry path, when the database answers at once (the failure
        was not the database's: a gateway's connection error, say) or when this outage has
        lasted past `RetryPolicy.unavailable_seconds` (one budget per outage, not per
        message). Concurrent callers share one probe.
        """
        async with self._probe_lock:
            delay = 0.1
            while True:
                if self._recovered_at >= failed_at:
                    return True  # the outage this message met ended while it waited for the lock
                try:
                    await asyncio.wait_for(self.probe(), timeout=5.0)
                except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
                    now = time.monotonic()
                    if self._down_since is None:
                        self._down_since = now
                        log.warning("database.unavailable", error=failure_reason(exc))
                    if now + delay > self._down_since + self.retry.unavailable_seconds:
                        return False
                else:
                    if self._down_since is None:
                        return False
                    log.info("database.available", down_seconds=round(time.monotonic() - self._down_since, 3))
                    self._down_since = None
                    self._recovered_at = time.monotonic()
                    return True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _select_one(self) -> None:
        async with self.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    def _decode(self, delivery: Delivery) -> Message[Any]:
        message = decode(delivery.body)
        if not delivery.message_id:
            raise ContractError("AMQP message-id property is missing")
        if delivery.message_id != str(message.message_id):
            raise ContractError(f"AMQP message-id {delivery.message_id!r} != envelope message_id {message.message_id}")
        if message.type not in self.handlers:
            raise ContractError(f"queue {delivery.queue.name!r} has no handler for {message.type!r}")
        return message

    def _span(self, delivery: Delivery, message: Message[Any]) -> Any:
        """The consumer span, a child of the producer's trace carried by the message: inbox check and handler."""
        return tracer.start_as_current_span(
            f"{delivery.queue.name} process {message.type}",
            context=context_from(message.envelope.traceparent, delivery.headers),
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.destination.name": delivery.queue.name,
                "messaging.consumer.group.name": self.consumer,
                "messaging.message.id": str(message.message_id),
                "messaging.message.conversation_id": message.correlation_id,
                "compensa.saga_id": message.correlation_id,
                "compensa.attempt": delivery.attempt,
                "compensa.handler": self.service,
            },
        )

    def _settle_span(self, delivery: Delivery, message: Message[Any] | None, exc: BaseException) -> Any:
        """The span of a failed delivery's retry, deferral or dead letter, in the message's trace.

        A child of the failed process span, which has ended by then (its transaction rolled
        back): without it the lines saying what became of the message would carry no trace
        id. A body that never decoded hangs under the trace in its AMQP headers, if any.
        """
        processing = _PROCESSING.get()
        span = tracer.start_as_current_span(
            f"{delivery.queue.name} settle {message.type if message else 'undecodable'}",
            context=trace.set_span_in_context(processing)
            if processing is not None
            else context_from(message.envelope.traceparent if message else None, delivery.headers),
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.operation.type": "settle",
                "messaging.destination.name": delivery.queue.name,
                "messaging.consumer.group.name": self.consumer,
                "messaging.message.id": delivery.message_id or "",
                "compensa.attempt": delivery.attempt,
                "compensa.saga_id": message.correlation_id if message else "",
                "error.type": type(exc).__qualname__,
            },
            record_exception=False,
            set_status_on_exception=True,
        )
        return span

    async def _apply(self, uow: UnitOfWork, delivery: Delivery, message: Message[Any]) -> bool:
        """Record the message in the inbox and run its handler; False for a duplicate."""
        started = time.perf_counter()
        with self._span(delivery, message) as span:
            _PROCESSING.set(span)
            if await uow.seen(self.consumer, message):
                log.info("message.duplicate_skipped", message_id=str(message.message_id))
                return False
            # The handler runs in the process span (no span of its own: a tenth of the
            # spans per saga, and exporting each one is most of what tracing costs).
            await self.handlers[message.type](uow, message)
        instruments.consumer_handler_duration.record(
            time.perf_counter() - started, {"queue": delivery.queue.name, "message_type": message.type}
        )
        return True

    async def _process(self, delivery: Delivery, message: Message[Any]) -> None:
        async with self.uow_factory(self.engine, self.service, self.clock, incoming=message) as uow:
            applied = await self._apply(uow, delivery, message)
            if applied:
                await uow.commit()
        self._count(applied, delivery)
        await _ack_committed(delivery)

    def _count(self, applied: bool, delivery: Delivery) -> None:
        if applied:
            self.processed += 1
        else:
            self.duplicates += 1
        instruments.consumer_messages.add(
            1, {"queue": delivery.queue.name, "outcome": "processed" if applied else "duplicate", "reason_class": ""}
        )

    async def process_batch(self, deliveries: list[Delivery]) -> None:
        """Apply deliveries that arrived together in one transaction, then ack them all.

        The same guarantees as one at a time: inbox rows, effects and outgoing messages
        of the whole batch commit together, and nothing is acked before that. If any
        message fails, the batch rolls back and each delivery is processed on its own,
        so the failure is classified (retry, DLQ) for that message alone.
        """
        decoded: list[tuple[Delivery, Message[Any]]] = []
        alone: list[tuple[Delivery, Message[Any] | None]] = []
        for delivery in deliveries:
            try:
                decoded.append((delivery, self._decode(delivery)))
            except Exception:  # noqa: BLE001 - handled alone, where it is classified (a DLQ)
                alone.append((delivery, None))
        if len(decoded) <= 1:
            await self._each([*alone, *decoded])
            return
        try:
            outcomes = []
            async with self.uow_factory(self.engine, self.service, self.clock) as uow:
                if self.lock_batch is not None:
                    await self.lock_batch(uow, [message for _, message in decoded])
                for delivery, message in decoded:
                    uow.incoming = message
                    outcomes.append(await self._apply(uow, delivery, message))
                await uow.commit()
        except Exception as exc:  # noqa: BLE001 - every message is retried alone, where it is classified
            self.batch_splits += 1
            log.info("batch.split", size=len(decoded), error=repr(exc))
            await self._each([*alone, *decoded])
            return
        for applied, (delivery, _) in zip(outcomes, decoded, strict=True):
            self._count(applied, delivery)
        for delivery, _ in decoded:
            await _ack_committed(delivery)
        await self._each(alone)

    async def _each(self, deliveries: Sequence[tuple[Delivery, Message[Any] | None]]) -> None:
        """Process each delivery alone; one that cannot be settled (the broker refuses its
        dead letter, say) does not leave the others unprocessed: the first error is raised
        after all of them had their turn, and the unsettled one returns on reconnect."""
        failures: list[Exception] = []
        for delivery, message in deliveries:
            try:
                await self(delivery, message)
            except Exception as exc:  # noqa: BLE001 - raised below, after the rest
                log.error("message.unsettled", message_id=delivery.message_id, error=failure_reason(exc))
                failures.append(exc)
        if failures:
            raise failures[0]

    async def _retry_or_dead_letter(self, delivery: Delivery, exc: BaseException, message: Message[Any] | None) -> None:
        reason = failure_reason(exc)
        if isinstance(exc, Deferred) and self._may_defer(delivery):
            await self._defer(delivery, exc, reason)
            return
        if delivery.attempt >= self.retry.max_attempts:
            await self._dead_letter(
                delivery, "transient_exhausted", f"gave up after {delivery.attempt} attempts: {reason}", message
            )
            return
        delay_ms = self.retry.delay_ms(delivery.attempt)
        expiration_ms = self.retry.jittered_ms(delivery.attempt, self.rng)
        log.warning("message.retry_scheduled", error=reason, delay_ms=expiration_ms)
        await delivery.retry(delay_ms, expiration_ms, delivery.retry_headers("transient", reason, self.clock.now()))
        instruments.consumer_messages.add(1, {"queue": delivery.queue.name, "outcome": "retried", "reason_class": "transient"})

    def _may_defer(self, delivery: Delivery) -> bool:
        """A deferral uses no attempt, within one outage budget (`RetryPolicy.unavailable_seconds`)."""
        if self.retry.max_attempts < 2:
            return False  # no delay queue to wait in
        since = delivery.deferred_since()
        return since is None or (self.clock.now() - since).total_seconds() < self.retry.unavailable_seconds

    async def _defer(self, delivery: Delivery, exc: Deferred, reason: str) -> None:
        """Wait in the longest delay queue until the refusal may have passed (jittered, so a burst spreads)."""
        longest = self.retry.delay_ms(self.retry.max_attempts - 1)
        wanted = exc.retry_after_seconds * 1000 * (1 + self.rng.random() / 4)
        expiration_ms = int(min(max(wanted, 50), longest))
        log.info("message.deferred", reason_class=exc.reason_class, error=reason, delay_ms=expiration_ms)
        await delivery.retry(longest, expiration_ms, delivery.deferral_headers(exc.reason_class, reason, self.clock.now()))
        instruments.consumer_messages.add(
            1, {"queue": delivery.queue.name, "outcome": "deferred", "reason_class": reason_class_label(exc.reason_class)}
        )

    async def _dead_letter(self, delivery: Delivery, reason_class: str, reason: str, message: Message[Any] | None) -> None:
        saga_id = message.correlation_id if message else _guess_saga_id(delivery)
        log.error("message.dead_lettered", reason_class=reason_class, reason=reason, saga_id=saga_id)
        await delivery.dead_letter(delivery.dead_letter_headers(reason_class, reason, self.clock.now(), saga_id))
        instruments.consumer_messages.add(
            1, {"queue": delivery.queue.name, "outcome": "dead_lettered", "reason_class": reason_class_label(reason_class)}
        )


async def _ack_committed(delivery: Delivery) -> None:
    """Acknowledge a delivery whose effect is committed.

    If the ack fails (the channel dropped), the broker redelivers the message and the
    inbox skips it: that is not a failure of the message, so it is logged, not
    retried or dead-lettered.
    """
    try:
        await delivery.ack()
    except TransientError as exc:
        log.warning("message.ack_failed_after_commit", error=failure_reason(exc))


def _guess_saga_id(delivery: Delivery) -> str | None:
    """Best effort for undecodable messages: the AMQP correlation id, if any was set."""
    return delivery.correlation_id or None


class BatchingConsumer:
    """Hand deliveries that arrive together to a processor as batches.

    The transport calls this once per delivery, concurrently (up to the prefetch);
    each call waits until its delivery was processed. A few workers each take what
    is waiting, up to `max_batch`, so an idle queue costs no latency and a busy one
    shares one commit among many messages.
    """

    def __init__(self, processor: MessageProcessor, *, max_batch: int = 50, workers: int = 4) -> None:
        self.processor = processor
        self.max_batch = max_batch
        self.workers = workers
        self._waiting: asyncio.Queue[tuple[Delivery, asyncio.Future[None]]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self.largest_batch = 0

    async def __call__(self, delivery: Delivery) -> None:
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._work(), name=f"batch:{self.processor.consumer}") for _ in range(self.workers)
            ]
        done = asyncio.get_running_loop().create_future()
        await self._waiting.put((delivery, done))
        await done

    async def _work(self) -> None:
        while True:
            batch = [await self._waiting.get()]
            while len(batch) < self.max_batch and not self._waiting.empty():
                batch.append(self._waiting.get_nowait())
            self.largest_batch = max(self.largest_batch, len(batch))
            try:
                await self.processor.process_batch([delivery for delivery, _ in batch])
            except BaseException as exc:  # handed to each waiting caller
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            for _, done in batch:
                if not done.done():
                    done.set_result(None)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks = []


class AdmissionGate:
    """Let a start message through only while fewer than `limit` sagas are in flight.

    Work already started must not time out because new work arrives: under a burst,
    the starts wait in their own queue (un-started, visible as its depth) and each
    admitted saga meets participant queues no longer than the bound allows. The count
    comes from the database, so several orchestrator processes share one bound; between
    recounts (every `refresh_seconds`) this process adds its own admissions. A count
    that fails (database down) admits: the processor then waits for the database.
    """

    def __init__(
        self,
        count_in_flight: Callable[[], Awaitable[int]],
        limit: int,
        *,
        refresh_seconds: float = 0.1,
        poll_seconds: float = 0.05,
    ) -> None:
        self.count_in_flight = count_in_flight
        self.limit = limit
        self.refresh_seconds = refresh_seconds
        self.poll_seconds = poll_seconds
        self._estimate = 0
        self._counted_at = -float("inf")
        self._lock = asyncio.Lock()
        self._in_progress = 0
        #: Admissions that had to wait for a saga to finish first.
        self.waited = 0

    async def admit(self) -> None:
        async with self._lock:  # one admission at a time keeps the estimate exact here
            waiting = False
            while True:
                if time.monotonic() - self._counted_at >= self.refresh_seconds:
                    # Admitted starts still being applied are not in the count yet; taken
                    # before counting, so one that commits meanwhile is counted (twice at worst).
                    in_progress = self._in_progress
                    try:
                        self._estimate = await self.count_in_flight() + in_progress
                    except Exception as exc:  # noqa: BLE001 - fail open, see the class docstring
                        log.warning("admission.count_failed", error=failure_reason(exc))
                        return
                    self._counted_at = time.monotonic()
                if self._estimate < self.limit:
                    self._estimate += 1
                    self.waited += waiting
                    return
                waiting = True
                await asyncio.sleep(self.poll_seconds)
                self._counted_at = -float("inf")  # recount: sagas may have finished

    def guard(self, handler: Callable[[Delivery], Awaitable[None]]) -> Callable[[Delivery], Awaitable[None]]:
        """`handler`, called for each delivery once the gate admits it."""

        async def admitted(delivery: Delivery) -> None:
            await self.admit()
            self._in_progress += 1
            try:
                await handler(delivery)
            finally:
                self._in_progress -= 1

        return admitted
