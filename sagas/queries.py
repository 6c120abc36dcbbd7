"""The saga read side: what `compensa saga list|show` and `dlq show` print, as plain rows.

Queries only, over the saga tables (`sagas/tables.py`): the commands format what these
return and never hold SQL of their own. Times come back as the database hands them
(SQLite's are naive UTC); the caller makes them aware when it prints them.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from sagas.state import TERMINAL
from sagas.tables import saga_history as h
from sagas.tables import saga_instances as s

#: Columns of a saga listing.
LIST_COLUMNS = (s.c.saga_id, s.c.status, s.c.step, s.c.reason, s.c.started_at, s.c.updated_at)


async def list_sagas(
    connection: AsyncConnection,
    *,
    status: str | None = None,
    started_before: datetime | None = None,
    unfinished_since: datetime | None = None,
    definitions: Sequence[str] | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    """Sagas, most recently updated first.

    `started_before` keeps sagas started before that time; `unfinished_since` keeps
    sagas not in a terminal state and not updated since that time (stuck ones);
    `definitions` keeps sagas of those definitions (an app's, when apps share a database).
    """
    query = select(*LIST_COLUMNS).order_by(s.c.updated_at.desc()).limit(limit)
    if definitions is not None:
        query = query.where(s.c.definition.in_(list(definitions)))
    if status:
        query = query.where(s.c.status == status)
    if started_before is not None:
        query = query.where(s.c.started_at < started_before)
    if unfinished_since is not None:
        query = query.where(
            s.c.status.not_in([terminal.value for terminal in TERMINAL]),
            s.c.updated_at < unfinished_since,
        )
    return [dict(row._mapping) for row in (await connection.execute(query)).all()]


async def get_saga(connection: AsyncConnection, saga_id: str) -> dict[str, Any] | None:
    """One saga's row (every column), or None."""
    row = (await connection.execute(select(s).where(s.c.saga_id == saga_id))).one_or_none()
    return None if row is None else dict(row._mapping)


async def saga_history(connection: AsyncConnection, saga_id: str) -> list[dict[str, Any]]:
    """Every transition of a saga, in order; `sent` parsed from its JSON when it parses."""
    rows = (await connection.execute(select(h).where(h.c.saga_id == saga_id).order_by(h.c.version))).all()
    history = [dict(row._mapping) for row in rows]
    for entry in history:
        with contextlib.suppress(ValueError, RecursionError):  # an old or damaged row: shown as stored
            entry["sent"] = json.loads(entry["sent"])
    return history


async def saga_summary(connection: AsyncConnection, saga_id: str | None, transitions: int = 5) -> dict[str, Any] | None:
    """Where a saga stands and its last `transitions` transitions (for a dead letter's page).

    None when no saga is named; a row with status None when the id names no saga.
    """
    if not saga_id:
        return None
    saga = (
        await connection.execute(
            select(s.c.saga_id, s.c.status, s.c.step, s.c.reason, s.c.version, s.c.updated_at).where(s.c.saga_id == saga_id)
        )
    ).one_or_none()
    if saga is None:
        return {"saga_id": saga_id, "status": None, "note": "no saga with this id (never started, or not a saga message)"}
    history = (
        await connection.execute(
            select(h.c.version, h.c.at, h.c.trigger, h.c.from_status, h.c.to_status, h.c.note)
            .where(h.c.saga_id == saga_id)
            .order_by(h.c.version.desc())
            .limit(transitions)
        )
    ).all()
    return {**dict(saga._mapping), "last_transitions": [dict(r._mapping) for r in reversed(history)]}


#: Characters that mean something to LIKE: escaped in a prefix search.
_LIKE_SPECIAL = str.maketrans({"\\": "\\\\", "%": "\\%", "_": "\\_"})


async def page_sagas(
    connection: AsyncConnection,
    *,
    status: str | None = None,
    definition: str | None = None,
    started_before: datetime | None = None,
    unfinished_since: datetime | None = None,
    id_prefix: str | None = None,
    after: tuple[datetime, str] | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    """One page of sagas, most recently updated first, continuing after `after` (updated_at, saga_id).

    Keyset paging on (updated_at, saga_id), which `ix_saga_instances_updated` serves (within
    one status `ix_saga_instances_status_updated`, one saga type
    `ix_saga_instances_definition_updated`, stuck ones the partial
    `ix_saga_instances_unfinished_updated`); `id_prefix` is a LIKE on the id's beginning,
    which `ix_saga_instances_id_prefix` serves.
    """
    query = select(*LIST_COLUMNS, s.c.definition, s.c.version).order_by(s.c.updated_at.desc(), s.c.saga_id.desc()).limit(limit)
    if status:
        query = query.where(s.c.status == status)
    if definition:
        query = query.where(s.c.definition == definition)
    if started_before is not None:
        query = query.where(s.c.started_at < started_before)
    if unfinished_since is not None:
        query = query.where(
            s.c.status.not_in([terminal.value for terminal in TERMINAL]),
            s.c.updated_at < unfinished_since,
        )
    if id_prefix:
        query = query.where(s.c.saga_id.like(id_prefix.translate(_LIKE_SPECIAL) + "%", escape="\\"))
    if after is not None:
        updated, saga_id = after
        query = query.where(
            (s.c.updated_at < updated) | ((s.c.updated_at == updated) & (s.c.saga_id < saga_id)),
        )
    return [dict(row._mapping) for row in (await connection.execute(query)).all()]


async def status_counts(connection: AsyncConnection, statuses: Sequence[str] | None = None) -> dict[str, int]:
    """How many sagas are in each status (in each of `statuses` only, when given).

    Every status is a scan of the whole table; a few rare ones (the live counts'
    running and compensation_failed) are read from `ix_saga_instances_status_updated`.
    """
    query = select(s.c.status, func.count()).group_by(s.c.status)
    if statuses is not None:
        query = query.where(s.c.status.in_(list(statuses)))
    rows = (await connection.execute(query)).all()
    return {status: int(count) for status, count in rows}


async def stuck_count(connection: AsyncConnection, unfinished_since: datetime) -> int:
    """Sagas not in a terminal state and not updated since `unfinished_since` (`ix_saga_instances_unfinished_updated`)."""
    query = select(func.count()).where(
        s.c.status.not_in([terminal.value for terminal in TERMINAL]), s.c.updated_at < unfinished_since
    )
    return int((await connection.execute(query)).scalar_one())
