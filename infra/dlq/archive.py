"""The dead-letter archive: move every `<queue>.dlq` message into the `dead_letters` table.

Each delivery is stored in its own transaction and acknowledged only after the
commit. A crash between commit and ack redelivers the message; its dedup key (a hash
of the DLQ, message id, body and headers) is unique, so the second insert does
nothing and the redelivery is simply acknowledged. Whatever the body holds, it is
stored: a body that is not a readable envelope is archived as type `<undecodable>`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts import ContractError, parse_envelope
from contracts.clock import Clock
from infra import topology as t
from infra.dlq.tables import NEW, UNDECODABLE, dead_letters
from infra.transport.base import Delivery, Subscription, Transport
from outbox.uow import insert_ignoring_duplicates

log = structlog.get_logger("compensa.dlq")

SERVICE = "dlq"


def jsonable(value: Any) -> Any:
    """AMQP header values (bytes, datetimes, decimals, nested tables) as plain JSON values."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, datetime):
        return _aware(value).isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _text(value: Any, limit: int) -> str | None:
    if value is None or value == "":
        return None
    text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return text[:limit]


def _header(headers: Mapping[str, Any], name: str, default: str | None) -> str:
    if name in headers and headers[name] is not None:
        return _text(headers[name], 255) or ""
    return (default or "")[:255]


def _time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return _aware(value)
    text = _text(value, 64)
    if text is None:
        return None
    try:
        return _aware(datetime.fromisoformat(text))
    except ValueError:
        return None


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _broker_death(headers: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """RabbitMQ's own dead-lettering record (a rejected or expired message), if any."""
    deaths = headers.get("x-death")
    if isinstance(deaths, list | tuple) and deaths and isinstance(deaths[0], Mapping):
        return deaths[0]
    return None


def dead_letter_row(delivery: Delivery, now: datetime) -> dict[str, Any]:
    """Everything known about one dead letter, as a `dead_letters` row. Never raises."""
    headers = {str(k): v for k, v in delivery.headers.items()}
    headers_json = json.dumps(jsonable(headers), sort_keys=True)
    body = bytes(delivery.body)
    try:
        body_text, encoding = body.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        body_text, encoding = base64.b64encode(body).decode("ascii"), "base64"
    message_type, version, correlation_id, envelope_id = UNDECODABLE, None, None, None
    try:
        envelope = parse_envelope(body)
        message_type, version = envelope.type, envelope.version
        correlation_id, envelope_id = envelope.correlation_id, str(envelope.message_id)
    except ContractError:
        pass
    death = _broker_death(headers)
    dlq_name = delivery.queue.name
    default_queue = dlq_name.removesuffix(".dlq")
    if death is not None and t.H_REASON_CLASS not in headers:
        # Dead-lettered by RabbitMQ itself (rejected, expired, over length), not by compensa.
        routing_keys = death.get("routing-keys") or [delivery.routing_key]
        queue = _text(death.get("queue"), 255) or default_queue
        reason_class = f"broker_{_text(death.get('reason'), 40) or 'dead_lettered'}"
        reason = f"dead-lettered by RabbitMQ ({_text(death.get('reason'), 40)}) from queue {queue}"
        attempts = _int(death.get("count"), 1)
        original_exchange = _text(death.get("exchange"), 255) or ""
        original_routing_key = _text(routing_keys[0] if routing_keys else "", 255) or ""
        first_failure = last_failure = _time(death.get("time"))
    else:
        queue = _text(headers.get(t.H_ORIGINAL_QUEUE), 255) or default_queue
        reason_class = _text(headers.get(t.H_REASON_CLASS), 64) or "unknown"
        reason = _text(headers.get(t.H_REASON), 100_000) or "no reason header: not dead-lettered by compensa"
        attempts = _int(headers.get(t.H_ATTEMPT), 1)
        # "" is a real original exchange (the default one), so presence decides, not truth.
        original_exchange = _header(headers, t.H_ORIGINAL_EXCHANGE, delivery.exchange)
        original_routing_key = _header(headers, t.H_ORIGINAL_ROUTING_KEY, delivery.routing_key)
        first_failure = _time(headers.get(t.H_FIRST_FAILURE))
        last_failure = _time(headers.get(t.H_LAST_FAILURE))
    last_failure = last_failure or now
    message_id = _text(delivery.message_id, 255) or envelope_id
    saga_id = _text(headers.get(t.H_SAGA_ID), 64) or correlation_id or _text(delivery.correlation_id, 64)
    dedup = hashlib.sha256(
        json.dumps(
            [dlq_name, message_id, hashlib.sha256(body).hexdigest(), headers_json], separators=(",", ":")
        ).encode()
    ).hexdigest()
    return {
        "dedup_key": dedup,
        "queue": queue,
        "dlq": dlq_name,
        "message_id": message_id,
        "type": message_type[:64],
        "version": version,
        "saga_id": saga_id,
        "reason_class": reason_class,
        "reason": reason,
        "attempts": attempts,
        "original_exchange": original_exchange,
        "original_routing_key": original_routing_key,
        "first_failure_at": first_failure or last_failure,
        "last_failure_at": last_failure,
        "body": body_text,
        "body_encoding": encoding,
        "headers": headers_json,
        "archived_at": now,
        "status": NEW,
        "replay_count": 0,
    }


class DeadLetterArchive:
    """The delivery handler of every `<queue>.dlq`: store, commit, then acknowledge.

    Deliveries that arrive while a commit is in flight are stored together in the
    next transaction (up to `batch_size`), so a flood of dead letters costs one
    commit per batch, not per message; each is still acknowledged only after the
    commit that holds it.
    """

    def __init__(self, engine: AsyncEngine, clock: Clock, *, batch_size: int = 200, max_backoff_seconds: float = 10.0) -> None:
        self.engine = engine
        self.clock = clock
        self.batch_size = batch_size
        self.max_backoff_seconds = max_backoff_seconds
        self.archived = 0
        self.duplicates = 0
        self._waiting: list[tuple[dict[str, Any], asyncio.Future[bool]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def store(self, rows: Sequence[Mapping[str, Any]]) -> set[str]:
        """Insert the rows in one transaction; return the dedup keys that were new."""
        async with self.engine.begin() as connection:
            statement = insert_ignoring_duplicates(connection, dead_letters).returning(dead_letters.c.dedup_key)
            result = await connection.execute(statement, [dict(row) for row in rows])
            return set(result.scalars())

    async def __call__(self, delivery: Delivery) -> None:
        row = dead_letter_row(delivery, self.clock.now())
        stored: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append((row, stored))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="dlq:archive")
        if await stored:
            self.archived += 1
            log.info(
                "dlq.archived",
                dlq=row["dlq"],
                message_id=row["message_id"],
                message_type=row["type"],
                saga_id=row["saga_id"],
                reason_class=row["reason_class"],
            )
        else:
            self.duplicates += 1
            log.info("dlq.duplicate_skipped", dlq=row["dlq"], message_id=row["message_id"])
        await delivery.ack()

    async def _flush(self) -> None:
        """Commit waiting rows batch by batch until none is left; retry a failed batch."""
        await asyncio.sleep(0)  # let deliveries that are already due join the first batch
        backoff = 0.1
        while self._waiting:
            batch = self._waiting[: self.batch_size]
            try:
                new_keys = await self.store([row for row, _ in batch])
            except Exception as exc:  # noqa: BLE001 - keep the messages unacked and try again; never drop them
                log.warning("dlq.archive_failed", count=len(batch), error=repr(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_seconds)
                continue
            backoff = 0.1
            del self._waiting[: len(batch)]
            for row, stored in batch:
                first = row["dedup_key"] in new_keys
                new_keys.discard(row["dedup_key"])  # a second copy in the same batch is a duplicate
                if not stored.done():
                    stored.set_result(first)


async def start_archive(
    transport: Transport,
    engine: AsyncEngine,
    clock: Clock,
    prefetch: int,
    *,
    queues: Sequence[t.QueueSpec] = t.DEAD_LETTER_QUEUES,
) -> tuple[DeadLetterArchive, list[Subscription]]:
    """Consume every dead-letter queue into the archive; return the handler and subscriptions."""
    archive = DeadLetterArchive(engine, clock)
    subscriptions = [await transport.consume(queue, archive, prefetch) for queue in queues]
    log.info("dlq.archive_started", queues=[q.name for q in queues])
    return archive, subscriptions
