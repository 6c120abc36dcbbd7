"""Replay dead letters: validate, write to the `dlq` outbox, mark replayed, in one transaction.

A replay sends the message again under its own message id, to its original queue
only (the default exchange, routing key = queue), so other subscribers of an event
do not get it twice and a consumer that already applied it skips it in its inbox.
The outbox row and the `replayed` mark commit together: a crash before the commit
leaves the dead letter `new` and nothing queued; after it, the relay delivers the
message (at least once) and a second replay of the same dead letter is skipped.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts import REGISTRY, ContractError, Message, Registry, parse_envelope, validate_payload
from contracts.clock import Clock
from contracts.routing import DEFAULT_EXCHANGE
from infra import topology as t
from infra.dlq.tables import NEW, PURGED, REPLAYED, UNDECODABLE, dead_letters
from outbox.uow import UnitOfWork

dl = dead_letters
SERVICE = "dlq"

Action = Literal["replayed", "would_replay", "skipped", "refused"]


def merge_patch(target: Any, patch: Any) -> Any:
    """Apply an RFC 7396 JSON merge patch: objects merge, null deletes, anything else replaces."""
    if not isinstance(patch, Mapping):
        return patch
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


@dataclass(frozen=True)
class Outcome:
    """What happened (or would happen) to one dead letter."""

    id: int
    action: Action
    detail: str
    queue: str | None = None
    message_id: str | None = None
    type: str | None = None
    payload: Any = None


@dataclass
class ReplaySummary:
    dry_run: bool
    replayed: int = 0
    skipped: int = 0
    refused: int = 0
    outcomes: list[Outcome] = field(default_factory=list)

    def add(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        if outcome.action in ("replayed", "would_replay"):
            self.replayed += 1
        elif outcome.action == "skipped":
            self.skipped += 1
        else:
            self.refused += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "replayed": self.replayed,
            "skipped": self.skipped,
            "refused": self.refused,
            "outcomes": [asdict(o) for o in self.outcomes],
        }


def prepare(
    row: Any,
    patch: Mapping[str, Any] | None,
    queues: Mapping[str, t.QueueSpec],
    registry: Registry = REGISTRY,
) -> Message[Any] | str:
    """The message to send again for this dead letter, or why it cannot be replayed."""
    body: str | bytes = row.body
    if row.body_encoding == "base64":
        # Stored base64 because it is not UTF-8 or holds NUL; the envelope parser reads the raw bytes.
        try:
            body = base64.b64decode(row.body, validate=True)
        except ValueError:
            return f"cannot replay {UNDECODABLE}: the base64 body does not decode; purge it once handled"
    elif row.body_encoding != "utf-8":
        return f"cannot replay {UNDECODABLE}: unknown body encoding {row.body_encoding!r}; purge it once handled"
    try:
        envelope = parse_envelope(body)
    except ContractError as exc:
        return f"cannot replay {UNDECODABLE}: {exc}; purge it once handled"
    queue = queues.get(row.queue)
    if queue is None:
        return f"queue {row.queue!r} is not in the topology (known: {', '.join(sorted(queues))})"
    if destination(row.queue, envelope.type, tuple(queues.values())) is None:
        return f"queue {queue.name} does not consume {envelope.type}"
    if patch is not None:
        envelope = envelope.model_copy(update={"payload": merge_patch(envelope.payload, patch)})
    try:
        return validate_payload(envelope, registry)
    except ContractError as exc:
        return str(exc)


def destination(queue_name: str, message_type: str, queues: Sequence[t.QueueSpec] = t.WORK_QUEUES) -> str | None:
    """The queue a replay goes to (of `queues`, the order app's by default): where the message failed, or where its
    type moved since."""
    queue = t.consuming_queue(queue_name, message_type, queues)
    return queue.name if queue is not None else None


def _iso(moment: datetime | None) -> str:
    if moment is None:
        return "?"
    return moment.isoformat(timespec="seconds")


def _chunks(ids: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


async def replay(
    engine: AsyncEngine,
    clock: Clock,
    ids: Sequence[int],
    *,
    patch: Mapping[str, Any] | None = None,
    dry_run: bool = False,
    batch_size: int = 200,
    queues: Mapping[str, t.QueueSpec] | None = None,
    registry: Registry = REGISTRY,
    on_progress: Callable[[int], None] | None = None,
) -> ReplaySummary:
    """Replay the dead letters with these ids, `batch_size` per transaction, in id order.

    Each transaction locks its dead letters, skips those already replayed or purged,
    refuses those that fail their contract (after the merge `patch`, when given),
    writes the rest to the `dlq` outbox addressed to their original queue and marks
    them replayed. With `dry_run` nothing is written. `queues`, by name, are the work
    queues replays may go to: the hosted app's (`Footprint.queues`), the order app's by default.
    """
    queues = queues if queues is not None else {q.name: q for q in t.WORK_QUEUES}
    known = tuple(queues.values())
    summary = ReplaySummary(dry_run=dry_run)
    patch_text = json.dumps(patch, sort_keys=True) if patch is not None else None
    for chunk in _chunks(list(ids), batch_size):
        async with UnitOfWork(engine, SERVICE, clock) as uow:
            query = select(dl).where(dl.c.id.in_(chunk)).order_by(dl.c.id)
            if not dry_run:
                # Two operators replaying the same rows: the second waits, then sees `replayed`.
                query = query.with_for_update()
            rows = {row.id: row for row in (await uow.connection.execute(query)).all()}
            replayed_ids = []
            for dead_letter_id in chunk:
                row = rows.get(dead_letter_id)
                if row is None:
                    summary.add(Outcome(dead_letter_id, "refused", "no such dead letter"))
                    continue
                base = {"queue": row.queue, "message_id": row.message_id, "type": row.type}
                if row.status == REPLAYED:
                    summary.add(Outcome(row.id, "skipped", f"already replayed at {_iso(row.replayed_at)}", **base))
                    continue
                if row.status == PURGED:
                    summary.add(Outcome(row.id, "skipped", "purged", **base))
                    continue
                prepared = prepare(row, patch, queues, registry)
                if isinstance(prepared, str):
                    summary.add(Outcome(row.id, "refused", prepared, **base))
                    continue
                payload = prepared.envelope.payload if patch is not None else None
                target = destination(row.queue, prepared.type, known) or row.queue
                if dry_run:
                    summary.add(Outcome(row.id, "would_replay", f"would send to queue {target}", payload=payload, **base))
                    continue
                uow.add(prepared, exchange=DEFAULT_EXCHANGE, routing_key=target)
                replayed_ids.append(row.id)
                summary.add(Outcome(row.id, "replayed", f"sent to queue {target}", payload=payload, **base))
            if replayed_ids:
                await uow.connection.execute(
                    update(dl)
                    .where(dl.c.id.in_(replayed_ids), dl.c.status == NEW)
                    .values(
                        status=REPLAYED,
                        replayed_at=uow.now(),
                        replay_count=dl.c.replay_count + 1,
                        replay_patch=patch_text,
                    )
                )
                await uow.commit()
        if on_progress is not None:
            on_progress(len(chunk))
    return summary
