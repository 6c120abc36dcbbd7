"""Find dead letters: filters, listing, failure groups, one dead letter in full, purge."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Select, Update, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from contracts import json_depth
from infra.dlq.tables import NEW, PURGED, REPLAYED, STATUSES, dead_letters

dl = dead_letters
#: What `DeadLetterFilter.apply` narrows: a query or an update of dead letters.
_Filtered = TypeVar("_Filtered", Select[Any], Update)

#: Ids per statement when a query names dead letters one by one: each is a bind parameter,
#: and PostgreSQL (asyncpg) takes at most 32,767 of them, SQLite 32,766.
IDS_PER_STATEMENT = 5_000

#: Columns of a listing (everything but body and headers).
SUMMARY_COLUMNS = (
    dl.c.id,
    dl.c.queue,
    dl.c.type,
    dl.c.message_id,
    dl.c.saga_id,
    dl.c.reason_class,
    dl.c.reason,
    dl.c.attempts,
    dl.c.last_failure_at,
    dl.c.archived_at,
    dl.c.status,
    dl.c.replay_count,
)


@dataclass(frozen=True)
class DeadLetterFilter:
    """Which dead letters an operator means. Empty fields match everything."""

    ids: tuple[int, ...] = ()
    queue: str | None = None
    type: str | None = None
    reason_class: str | None = None
    saga_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    status: str | None = None

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in STATUSES:
            raise ValueError(f"unknown status {self.status!r}; choose from {', '.join(STATUSES)}")
        if self.since and self.until and self.since > self.until:
            raise ValueError(f"--since {self.since.isoformat()} is after --until {self.until.isoformat()}")

    @property
    def is_empty(self) -> bool:
        return not (
            self.ids or self.queue or self.type or self.reason_class or self.saga_id or self.since or self.until or self.status
        )

    def apply(self, query: _Filtered) -> _Filtered:
        """Add this filter's conditions (to a SELECT or an UPDATE); times compare with the last failure time."""
        if self.ids:
            query = query.where(dl.c.id.in_(self.ids))
        if self.queue:
            query = query.where(dl.c.queue == self.queue)
        if self.type:
            query = query.where(dl.c.type == self.type)
        if self.reason_class:
            query = query.where(dl.c.reason_class == self.reason_class)
        if self.saga_id:
            query = query.where(dl.c.saga_id == self.saga_id)
        if self.since:
            query = query.where(dl.c.last_failure_at >= self.since)
        if self.until:
            query = query.where(dl.c.last_failure_at < self.until)
        if self.status:
            query = query.where(dl.c.status == self.status)
        return query

    def describe(self) -> str:
        parts = [
            f"{name}={value}"
            for name, value in (
                ("ids", _id_ranges(self.ids) if self.ids else None),
                ("queue", self.queue),
                ("type", self.type),
                ("reason_class", self.reason_class),
                ("saga", self.saga_id),
                ("since", self.since.isoformat() if self.since else None),
                ("until", self.until.isoformat() if self.until else None),
                ("status", self.status),
            )
            if value
        ]
        return " ".join(parts) or "everything"


def _id_ranges(ids: Sequence[int], shown: int = 8) -> str:
    """`1-3,7,9-12`: ids as runs, the first `shown` runs only."""
    runs: list[list[int]] = []
    for i in sorted(set(ids)):
        if runs and runs[-1][1] + 1 == i:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    text = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs[:shown])
    return text + (f",… ({len(set(ids)):,} ids)" if len(runs) > shown else "")


def _batches(ids: Sequence[int]) -> list[Sequence[int]]:
    return [ids[start : start + IDS_PER_STATEMENT] for start in range(0, len(ids), IDS_PER_STATEMENT)]


async def list_dead_letters(
    connection: AsyncConnection, where: DeadLetterFilter, *, limit: int | None = 100
) -> list[dict[str, Any]]:
    """Matching dead letters, most recent failure first."""
    query = where.apply(select(*SUMMARY_COLUMNS)).order_by(dl.c.last_failure_at.desc(), dl.c.id.desc())
    if limit is not None:
        query = query.limit(limit)
    return [dict(row._mapping) for row in (await connection.execute(query)).all()]


async def count_dead_letters(connection: AsyncConnection, where: DeadLetterFilter) -> int:
    return int((await connection.execute(where.apply(select(func.count()).select_from(dl)))).scalar_one())


async def matching_ids(connection: AsyncConnection, where: DeadLetterFilter) -> list[int]:
    """Ids of the matching dead letters, oldest first (the order a replay follows)."""
    query = where.apply(select(dl.c.id)).order_by(dl.c.id)
    return list((await connection.execute(query)).scalars())


async def failure_groups(connection: AsyncConnection, where: DeadLetterFilter) -> list[dict[str, Any]]:
    """Counts per queue × reason class, with how many sagas and the failure time span."""
    query = (
        where.apply(
            select(
                dl.c.queue,
                dl.c.reason_class,
                func.count().label("count"),
                func.count(dl.c.saga_id.distinct()).label("sagas"),
                func.min(dl.c.last_failure_at).label("first_failure_at"),
                func.max(dl.c.last_failure_at).label("last_failure_at"),
                func.max(dl.c.reason).label("example_reason"),
            ).select_from(dl)
        )
        .group_by(dl.c.queue, dl.c.reason_class)
        .order_by(func.count().desc(), dl.c.queue, dl.c.reason_class)
    )
    return [dict(row._mapping) for row in (await connection.execute(query)).all()]


#: Deepest nesting of a stored body shown as JSON; a deeper one (no envelope nests so) is shown as text.
MAX_JSON_DEPTH = 64


def _stored_json(text: str) -> tuple[Any, bool]:
    """`text` parsed, and True; or `text` itself and False when it is not JSON a terminal can show.

    Whatever arrived is archived: the depth is bounded before parsing (json and Rich recurse),
    and numbers beyond Python's digit limit are a ValueError, not a crash.
    """
    if json_depth(text) > MAX_JSON_DEPTH:
        return text, False
    try:
        return json.loads(text), True
    except (ValueError, RecursionError):
        return text, False


def decoded_body(row: Any) -> tuple[Any, str]:
    """The body as JSON when it parses, else as text (or base64 for binary); and its form."""
    if row.body_encoding == "base64":
        raw = base64.b64decode(row.body)
        return row.body, f"base64 ({len(raw)} bytes, not UTF-8)"
    body, parsed = _stored_json(row.body)
    return (body, "json") if parsed else (body, "text")


async def get_dead_letter(connection: AsyncConnection, dead_letter_id: int) -> dict[str, Any] | None:
    """One dead letter with everything: parsed headers and body."""
    row = (await connection.execute(select(dl).where(dl.c.id == dead_letter_id))).one_or_none()
    if row is None:
        return None
    data = dict(row._mapping)
    headers, parsed = _stored_json(row.headers)
    # An old or damaged row: its headers shown as stored, under one name.
    data["headers"] = headers if parsed and isinstance(headers, dict) else {"(stored headers)": row.headers}
    data["body"], data["body_form"] = decoded_body(row)
    data["replay_patch"] = _stored_json(row.replay_patch)[0] if row.replay_patch else None
    data.pop("dedup_key", None)
    return data


async def missing_ids(connection: AsyncConnection, ids: Sequence[int]) -> list[int]:
    """Those of `ids` no dead letter has, in the given order."""
    found: set[int] = set()
    for batch in _batches(ids):
        found.update((await connection.execute(select(dl.c.id).where(dl.c.id.in_(batch)))).scalars())
    return [i for i in ids if i not in found]


async def purge(engine: AsyncEngine, where: DeadLetterFilter, now: datetime) -> int:
    """Mark matching dead letters purged (kept in the table, out of the way); return how many.

    Ids beyond IDS_PER_STATEMENT are purged in several statements, all in one transaction.
    """
    filters = [replace(where, ids=tuple(batch)) for batch in _batches(where.ids)] if where.ids else [where]
    purged = 0
    async with engine.begin() as connection:
        for part in filters:
            result = await connection.execute(
                part.apply(update(dl)).where(dl.c.status != PURGED).values(status=PURGED, purged_at=now)
            )
            purged += int(result.rowcount)
    return purged


async def prune(engine: AsyncEngine, older_than: datetime) -> dict[str, int]:
    """Delete dead letters dealt with (replayed or purged) before `older_than`; return counts.

    Dead letters still `new` are never deleted: somebody has yet to look at them.
    """
    resolved_at = func.coalesce(dl.c.purged_at, dl.c.replayed_at)
    async with engine.begin() as connection:
        deleted = (
            (
                await connection.execute(
                    delete(dl).where(dl.c.status.in_((REPLAYED, PURGED)), resolved_at < older_than).returning(dl.c.status)
                )
            )
            .scalars()
            .all()
        )
    return {REPLAYED: deleted.count(REPLAYED), PURGED: deleted.count(PURGED)}


async def open_counts(connection: AsyncConnection) -> dict[str, int]:
    """Dead letters still to deal with (status new), per queue."""
    query = select(dl.c.queue, func.count()).where(dl.c.status == NEW).group_by(dl.c.queue)
    return {queue: int(count) for queue, count in (await connection.execute(query)).all()}


async def failure_groups_by_type(connection: AsyncConnection, where: DeadLetterFilter) -> list[dict[str, Any]]:
    """Failure groups of the console: counts per queue × reason class × type, first and last seen."""
    query = (
        where.apply(
            select(
                dl.c.queue,
                dl.c.reason_class,
                dl.c.type,
                func.count().label("count"),
                func.count(dl.c.saga_id.distinct()).label("sagas"),
                func.min(dl.c.first_failure_at).label("first_seen"),
                func.max(dl.c.last_failure_at).label("last_seen"),
                func.max(dl.c.reason).label("example_reason"),
            ).select_from(dl)
        )
        .group_by(dl.c.queue, dl.c.reason_class, dl.c.type)
        .order_by(func.count().desc(), dl.c.queue, dl.c.reason_class, dl.c.type)
    )
    return [dict(row._mapping) for row in (await connection.execute(query)).all()]


async def page_dead_letters(
    connection: AsyncConnection,
    where: DeadLetterFilter,
    *,
    after: tuple[datetime, int] | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    """One page of matching dead letters, newest failure first, continuing after `after` (last failure, id).

    Keyset paging: a group's page reads `ix_dead_letters_group` from where the last one stopped.
    """
    query = where.apply(select(*SUMMARY_COLUMNS)).order_by(dl.c.last_failure_at.desc(), dl.c.id.desc()).limit(limit)
    if after is not None:
        failed, last_id = after
        query = query.where((dl.c.last_failure_at < failed) | ((dl.c.last_failure_at == failed) & (dl.c.id < last_id)))
    return [dict(row._mapping) for row in (await connection.execute(query)).all()]


async def new_count(connection: AsyncConnection) -> int:
    """Dead letters still to deal with (status new)."""
    return int((await connection.execute(select(func.count()).select_from(dl).where(dl.c.status == NEW))).scalar_one())


async def dead_letters_of_saga(connection: AsyncConnection, saga_id: str, limit: int = 200) -> list[dict[str, Any]]:
    """A saga's dead letters, oldest failure first (with when each was replayed or purged)."""
    query = (
        select(*SUMMARY_COLUMNS, dl.c.first_failure_at, dl.c.replayed_at, dl.c.purged_at)
        .where(dl.c.saga_id == saga_id)
        .order_by(dl.c.last_failure_at, dl.c.id)
        .limit(limit)
    )
    return [dict(row._mapping) for row in (await connection.execute(query)).all()]


async def saga_ids_of(connection: AsyncConnection, ids: Sequence[int]) -> dict[int, str | None]:
    """The saga each of these dead letters names."""
    found: dict[int, str | None] = {}
    for batch in _batches(ids):
        rows = await connection.execute(select(dl.c.id, dl.c.saga_id).where(dl.c.id.in_(batch)))
        found.update({row.id: row.saga_id for row in rows})
    return found
