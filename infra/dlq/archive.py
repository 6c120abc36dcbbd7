"""The dead-letter archive: move every `<queue>.dlq` message into the `dead_letters` table.

Each delivery is acknowledged only after the commit that stores it. A crash between
commit and ack redelivers the message; its dedup key (a hash of the DLQ, message id,
body and headers) is unique, so the second insert does nothing and the redelivery is
simply acknowledged. Whatever the body holds, it is stored: a body that is not a
readable envelope is archived as type `<undecodable>`.

No dead letter may wedge the archive. A row holds only what the database can hold
(integers within the column range, text without NUL or lone surrogates; a body that
is not UTF-8 or holds NUL as base64), and whatever had to be changed is kept, as text,
under `ORIGINALS_HEADER` in the stored headers. A batch the database refuses for its
data is stored again row by row; a row still refused is quarantined (reason class
`archive_quarantined`: raw body in base64, headers as an ASCII repr) and acknowledged.
Only a failure of the database itself (down, unreachable) leaves deliveries unacked
for a later retry.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

import structlog
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts import ContractError, parse_envelope
from contracts.clock import Clock
from infra import topology as t
from infra.db import sqlstate
from infra.dlq.tables import INTEGER_MAX, INTEGER_MIN, NEW, QUARANTINED, UNDECODABLE, dead_letters
from infra.pipeline import is_transient
from infra.telemetry import instruments
from infra.telemetry.catalogue import reason_class_label
from infra.transport.base import Delivery, Subscription, Transport
from outbox.uow import insert_ignoring_duplicates

log = structlog.get_logger("compensa.dlq")

SERVICE = "dlq"

#: Header added to the stored headers when a value had to be changed to be stored:
#: the originals, as text (`ascii()` of the Python value, or the decimal digits).
ORIGINALS_HEADER = "x-compensa-archive-originals"
#: The only key of a quarantined dead letter's headers: `ascii()` of every AMQP header.
QUARANTINED_HEADERS_KEY = "x-compensa-quarantined-headers"

#: NUL (PostgreSQL text cannot hold it) and surrogates (UTF-8 cannot encode them).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
#: What a NUL is stored as: SYMBOL FOR NULL, visible in a terminal and one character long.
NUL_SYMBOL = "\u2400"

Outcome = Literal["archived", "quarantined", "duplicate"]


def jsonable(value: Any) -> Any:
    """AMQP header values (bytes, datetimes, decimals, nested tables) as plain JSON values.

    Only hashed into the dedup key (so a redelivery matches), never stored: see `storable_json`.
    """
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


def storable_text(text: str) -> str:
    """Text that UTF-8 and PostgreSQL hold: NUL shown as ␀, a lone surrogate as U+FFFD."""
    if "\x00" not in text and text.isascii():
        return text
    return _UNSTORABLE.sub(lambda m: NUL_SYMBOL if m.group() == "\x00" else "\ufffd", text)


def storable_json(value: Any, changed: list[str]) -> Any:
    """A header value as JSON PostgreSQL can hold (also as jsonb); note a lossy change in `changed`."""
    if isinstance(value, bytes | bytearray):
        try:
            text = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            changed.append("bytes")
            text = bytes(value).decode("utf-8", errors="replace")
        return storable_json(text, changed)
    if isinstance(value, str):
        clean = storable_text(value)
        if clean != value:
            changed.append("text")
        return clean
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value  # JSON numbers have no range; the digits are the original
    if isinstance(value, float | Decimal):
        number = float(value) if not (isinstance(value, Decimal) and value.is_snan()) else math.nan
        if math.isfinite(number):
            return number
        changed.append("number")
        return str(value)  # NaN and infinities are not JSON
    if isinstance(value, datetime):
        return _aware(value).isoformat()
    if isinstance(value, Mapping):
        return {storable_json(str(k), changed): storable_json(v, changed) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [storable_json(v, changed) for v in value]
    changed.append(type(value).__name__)
    return storable_text(str(value))


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _text(value: Any, limit: int, *, storable: bool = True) -> str | None:
    if value is None or value == "" or value == b"":
        return None
    text = bytes(value).decode(errors="replace") if isinstance(value, bytes | bytearray) else str(value)
    return (storable_text(text) if storable else text)[:limit]


def _header(headers: Mapping[str, Any], name: str, default: str | None) -> str:
    if name in headers and headers[name] is not None:
        return _text(headers[name], 255) or ""
    return _text(default, 255) or ""


def _time(value: Any) -> datetime | None:
    if not isinstance(value, datetime):
        text = _text(value, 64)
        if text is None:
            return None
        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            return None
    try:
        return _aware(value).astimezone(UTC)  # an offset past year 1 or 9999 cannot be stored
    except (OverflowError, ValueError):
        return None


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError, ArithmeticError):  # not a number, NaN, infinite
        return default


def _column_int(value: int | None, name: str, originals: dict[str, str], *, nullable: bool) -> int | None:
    """`value` if an INTEGER column holds it; else NULL (or clamped), the original kept as text."""
    if value is None or INTEGER_MIN <= value <= INTEGER_MAX:
        return value
    originals[name] = str(value)
    if nullable:
        return None
    return max(INTEGER_MIN, min(INTEGER_MAX, value))


def _broker_death(headers: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """RabbitMQ's own dead-lettering record (a rejected or expired message), if any."""
    deaths = headers.get("x-death")
    if isinstance(deaths, list | tuple) and deaths and isinstance(deaths[0], Mapping):
        return deaths[0]
    return None


def _dedup_key(dlq: str, message_id: Any, body: bytes, headers_json: str) -> str:
    return hashlib.sha256(
        json.dumps([dlq, message_id, hashlib.sha256(body).hexdigest(), headers_json], separators=(",", ":")).encode()
    ).hexdigest()


def dead_letter_row(delivery: Delivery, now: datetime) -> dict[str, Any]:
    """Everything known about one dead letter, as a `dead_letters` row the database can hold."""
    headers = {str(k): v for k, v in (delivery.headers or {}).items()}
    originals: dict[str, str] = {}
    body = bytes(delivery.body)
    try:
        body_text, encoding = body.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        body_text, encoding = "", "base64"
    if encoding == "base64" or "\x00" in body_text:
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
        routing_keys = death.get("routing-keys")
        if not isinstance(routing_keys, list | tuple) or not routing_keys:
            routing_keys = [delivery.routing_key]
        queue = _text(death.get("queue"), 255) or default_queue
        why = _text(death.get("reason"), 40)
        reason_class = f"broker_{why or 'dead_lettered'}"[:64]
        reason = f"dead-lettered by RabbitMQ ({why}) from queue {queue}"
        attempts = _int(death.get("count"), 1)
        original_exchange = _text(death.get("exchange"), 255) or ""
        original_routing_key = _text(routing_keys[0], 255) or ""
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
    saga_id = _text(headers.get(t.H_SAGA_ID), 64) or _text(correlation_id, 64) or _text(delivery.correlation_id, 64)
    # The dedup key hashes what was received (a redelivery must match), not what is stored.
    dedup = _dedup_key(
        dlq_name,
        _text(delivery.message_id, 255, storable=False) or envelope_id,
        body,
        json.dumps(jsonable(headers), sort_keys=True),
    )
    stored_version = _column_int(version, "version", originals, nullable=True)
    stored_attempts = _column_int(attempts, "attempts", originals, nullable=False)
    for name, raw in (("message_id", delivery.message_id), ("correlation_id", delivery.correlation_id)):
        if raw is not None and not (isinstance(raw, str) and storable_text(raw) == raw):
            originals[name] = ascii(raw)
    if correlation_id is not None and storable_text(correlation_id) != correlation_id:
        originals["envelope.correlation_id"] = ascii(correlation_id)
    changed: list[str] = []
    stored_headers = storable_json(headers, changed)
    if changed or ORIGINALS_HEADER in headers:
        originals["headers"] = ascii(headers)
    if originals:
        stored_headers[ORIGINALS_HEADER] = originals
    return {
        "dedup_key": dedup,
        "queue": queue,
        "dlq": dlq_name,
        "message_id": message_id,
        "type": storable_text(message_type)[:64],
        "version": stored_version,
        "saga_id": saga_id,
        "reason_class": reason_class,
        "reason": reason,
        "attempts": stored_attempts,
        "original_exchange": original_exchange,
        "original_routing_key": original_routing_key,
        "first_failure_at": first_failure or last_failure,
        "last_failure_at": last_failure,
        "body": body_text,
        "body_encoding": encoding,
        "headers": json.dumps(stored_headers, sort_keys=True),
        "archived_at": now,
        "status": NEW,
        "replay_count": 0,
    }


def _ascii(value: Any, limit: int) -> str | None:
    """ASCII-only text of `value` (escapes for anything else), for a quarantined row."""
    if value is None:
        return None
    text = bytes(value).decode("ascii", errors="backslashreplace") if isinstance(value, bytes | bytearray) else str(value)
    return ascii(text)[1:-1][:limit]


def _safe_repr(value: Any) -> str:
    try:
        return ascii(value)
    except Exception as exc:  # noqa: BLE001 - a header value whose repr fails still gets a row
        return f"<headers not representable: {type(exc).__name__}>"


def quarantine_row(delivery: Delivery, now: datetime, error: BaseException, dedup_key: str | None = None) -> dict[str, Any]:
    """The minimal `dead_letters` row of a dead letter that could not be stored as read.

    Every value is ASCII and bounded: raw body in base64, headers as an ASCII repr, so
    nothing a message holds can make this insert fail. Reason class `archive_quarantined`.
    """
    body = bytes(delivery.body)
    headers_repr = _safe_repr(dict(delivery.headers or {}))
    dlq_name = delivery.queue.name
    error_text = _ascii(f"{type(error).__name__}: {error}", 2000)
    return {
        "dedup_key": dedup_key or _dedup_key(dlq_name, _ascii(delivery.message_id, 1000), body, f"quarantined:{headers_repr}"),
        "queue": dlq_name.removesuffix(".dlq"),
        "dlq": dlq_name,
        "message_id": _ascii(delivery.message_id, 255),
        "type": UNDECODABLE,
        "version": None,
        "saga_id": None,
        "reason_class": QUARANTINED,
        "reason": (
            f"the dead letter could not be archived as read ({error_text}); "
            "the body is the raw bytes in base64 and the headers an ASCII repr"
        ),
        "attempts": 1,
        "original_exchange": _ascii(delivery.exchange, 255) or "",
        "original_routing_key": _ascii(delivery.routing_key, 255) or "",
        "first_failure_at": now,
        "last_failure_at": now,
        "body": base64.b64encode(body).decode("ascii"),
        "body_encoding": "base64",
        "headers": json.dumps({QUARANTINED_HEADERS_KEY: headers_repr}),
        "archived_at": now,
        "status": NEW,
        "replay_count": 0,
    }


#: PostgreSQL SQLSTATE classes that say the server, not the row, failed: connection,
#: insufficient resources (disk full, too many connections), operator intervention, system.
_OUTAGE_SQLSTATE_CLASSES = ("08", "53", "57", "58")


def is_database_outage(exc: BaseException) -> bool:
    """A failure of the database, not of the rows: keep the deliveries unacked and retry.

    The pipeline's classification plus the server-side SQLSTATE classes above, except
    that an integrity error here is about the row (a constraint it breaks), not a race.
    Anything else is taken as the rows' fault: split the batch. Wrongly so costs little
    (a good row may be quarantined, its body intact); the other way round wedges the archive.
    """
    if isinstance(exc, IntegrityError):
        return False
    if is_transient(exc):
        return True
    if isinstance(exc, DBAPIError):
        code = sqlstate(exc)
        return code is not None and code[:2] in _OUTAGE_SQLSTATE_CLASSES
    return False


@dataclass
class _Waiting:
    row: dict[str, Any]
    delivery: Delivery
    outcome: asyncio.Future[Outcome]


class DeadLetterArchive:
    """The delivery handler of every `<queue>.dlq`: store, commit, then acknowledge.

    Deliveries that arrive while a commit is in flight are stored together in the
    next transaction (up to `batch_size`), so a flood of dead letters costs one
    commit per batch, not per message; each is still acknowledged only after the
    commit that holds it. A batch refused for its data is stored row by row, and a
    row still refused is quarantined, so one dead letter never blocks the others.
    """

    def __init__(self, engine: AsyncEngine, clock: Clock, *, batch_size: int = 200, max_backoff_seconds: float = 10.0) -> None:
        self.engine = engine
        self.clock = clock
        self.batch_size = batch_size
        self.max_backoff_seconds = max_backoff_seconds
        #: Rows stored (quarantined ones included), redeliveries skipped, rows quarantined.
        self.archived = 0
        self.duplicates = 0
        self.quarantined = 0
        #: Batches the database refused for their data and that were stored row by row.
        self.batch_splits = 0
        self._waiting: list[_Waiting] = []
        self._flusher: asyncio.Task[None] | None = None

    async def store(self, rows: Sequence[Mapping[str, Any]]) -> set[str]:
        """Insert the rows in one transaction; return the dedup keys that were new."""
        async with self.engine.begin() as connection:
            statement = insert_ignoring_duplicates(connection, dead_letters).returning(dead_letters.c.dedup_key)
            result = await connection.execute(statement, [dict(row) for row in rows])
            return set(result.scalars())

    async def __call__(self, delivery: Delivery) -> None:
        now = self.clock.now()
        try:
            row = dead_letter_row(delivery, now)
        except Exception as exc:  # noqa: BLE001 - a message no rule foresaw is quarantined, not lost
            log.error("dlq.unreadable", dlq=delivery.queue.name, error=repr(exc))
            row = quarantine_row(delivery, now, exc)
        waiting = _Waiting(row, delivery, asyncio.get_running_loop().create_future())
        self._waiting.append(waiting)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="dlq:archive")
        outcome = await waiting.outcome
        row = waiting.row
        if outcome == "duplicate":
            self.duplicates += 1
            log.info("dlq.duplicate_skipped", dlq=row["dlq"], message_id=row["message_id"])
        else:
            self.archived += 1
            # The DLQ it came from, not the queue its headers name: label values stay a closed set.
            labels = {"queue": row["dlq"].removesuffix(".dlq"), "reason_class": reason_class_label(row["reason_class"])}
            instruments.dead_letters_archived.add(1, labels)
            if outcome == "quarantined":
                self.quarantined += 1
                log.error("dlq.quarantined", dlq=row["dlq"], message_id=row["message_id"], reason=row["reason"])
            else:
                log.info(
                    "dlq.archived",
                    dlq=row["dlq"],
                    message_id=row["message_id"],
                    message_type=row["type"],
                    saga_id=row["saga_id"],
                    reason_class=row["reason_class"],
                )
        await delivery.ack()

    async def _flush(self) -> None:
        """Commit waiting rows batch by batch until none is left; retry while the database is out."""
        await asyncio.sleep(0)  # let deliveries that are already due join the first batch
        backoff = 0.1
        while self._waiting:
            batch = self._waiting[: self.batch_size]
            try:
                try:
                    new_keys = await self.store([waiting.row for waiting in batch])
                except Exception as exc:  # classified: an outage is retried, bad data split
                    if is_database_outage(exc):
                        raise
                    self.batch_splits += 1
                    log.warning("dlq.batch_refused", count=len(batch), error=repr(exc))
                    await self._store_each(batch)
                else:
                    del self._waiting[: len(batch)]
                    for waiting in batch:
                        _settle(waiting, waiting.row["dedup_key"] in new_keys)
                        new_keys.discard(waiting.row["dedup_key"])  # a second copy in the same batch is a duplicate
            except Exception as exc:  # noqa: BLE001 - keep the messages unacked and try again; never drop them
                log.warning("dlq.archive_failed", count=len(self._waiting), error=repr(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_seconds)
                continue
            backoff = 0.1

    async def _store_each(self, batch: Sequence[_Waiting]) -> None:
        """Store the batch one row per transaction, quarantining a row the database refuses.

        Raises (leaving this and later rows waiting) on a database outage, or when even
        the quarantined form cannot be stored: that is the table, not the message.
        """
        done = 0
        try:
            for waiting in batch:
                try:
                    new = waiting.row["dedup_key"] in await self.store([waiting.row])
                except Exception as exc:  # classified: an outage is retried, bad data quarantined
                    if is_database_outage(exc):
                        raise
                    log.warning("dlq.row_refused", dlq=waiting.row["dlq"], error=repr(exc))
                    waiting.row = quarantine_row(waiting.delivery, self.clock.now(), exc, waiting.row["dedup_key"])
                    try:
                        new = waiting.row["dedup_key"] in await self.store([waiting.row])
                    except Exception as final:
                        log.error("dlq.quarantine_failed", dlq=waiting.row["dlq"], error=repr(final))
                        raise
                _settle(waiting, new)
                done += 1
        finally:
            del self._waiting[:done]


def _settle(waiting: _Waiting, new: bool) -> None:
    if waiting.outcome.done():
        return
    if not new:
        waiting.outcome.set_result("duplicate")
    elif waiting.row["reason_class"] == QUARANTINED:
        waiting.outcome.set_result("quarantined")
    else:
        waiting.outcome.set_result("archived")


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
