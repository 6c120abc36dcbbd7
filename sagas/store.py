"""Load and save saga state on the orchestrator's connection, with optimistic locking.

A saga's single active deadline lives on its row: a transition writes state and
deadline with one INSERT (a start) or one UPDATE, and its history row. On PostgreSQL
the two writes are one statement (the history row inserted from the saga write's
RETURNING), so a step costs one round trip less; SQLite has no data-modifying WITH
and runs them one after the other.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from contracts import ConflictError
from sagas.state import Deadline, SagaState, SagaStatus
from sagas.tables import saga_history, saga_instances


def state_from_row(row: Any) -> SagaState:
    return SagaState(
        saga_id=row.saga_id,
        definition=row.definition,
        status=SagaStatus(row.status),
        step=row.step,
        data=json.loads(row.data),
        done_steps=tuple(json.loads(row.done_steps)),
        pending_compensations=tuple(json.loads(row.pending_compensations)),
        compensation_attempts=row.compensation_attempts,
        reason=row.reason,
        version=row.version,
        started_at=row.started_at,
        updated_at=row.updated_at,
    )


_NO_DEADLINE: dict[str, Any] = dict.fromkeys(("deadline_at", "deadline_kind", "deadline_step", "deadline_attempt"))


def deadline_from_row(row: Any) -> Deadline | None:
    """The saga row's active deadline, or None when it has none."""
    return None if row.deadline_at is None else _deadline(row)


def _deadline(row: Any) -> Deadline:
    return Deadline(due_at=row.deadline_at, kind=row.deadline_kind, step=row.deadline_step, attempt=row.deadline_attempt)


def _deadline_columns(deadline: Deadline | None) -> dict[str, Any]:
    if deadline is None:
        return dict(_NO_DEADLINE)
    return {
        "deadline_at": deadline.due_at,
        "deadline_kind": deadline.kind,
        "deadline_step": deadline.step,
        "deadline_attempt": deadline.attempt,
    }


def _columns(state: SagaState) -> dict[str, Any]:
    return {
        "definition": state.definition,
        "status": state.status.value,
        "step": state.step,
        "data": json.dumps(state.data, sort_keys=True),
        "done_steps": json.dumps(list(state.done_steps)),
        "pending_compensations": json.dumps(list(state.pending_compensations)),
        "compensation_attempts": state.compensation_attempts,
        "reason": state.reason,
        "version": state.version,
        "started_at": state.started_at,
        "updated_at": state.updated_at,
    }


# Built once: constructing a statement costs more than executing it.
_SELECT = select(saga_instances).where(saga_instances.c.saga_id == bindparam("b_saga_id"))
_SELECT_FOR_UPDATE = _SELECT.with_for_update()
_INSERT = insert(saga_instances)
_UPDATE = update(saga_instances).where(
    saga_instances.c.saga_id == bindparam("b_saga_id"), saga_instances.c.version == bindparam("b_version")
)
_CLEAR_DEADLINE = (
    update(saga_instances)
    .where(saga_instances.c.saga_id == bindparam("b_saga_id"), saga_instances.c.version == bindparam("b_version"))
    .values(_NO_DEADLINE)
)
_DUE = (
    select(saga_instances)
    .where(saga_instances.c.deadline_at <= bindparam("b_now"))
    .order_by(saga_instances.c.deadline_at)
    .limit(bindparam("b_limit"))
    .with_for_update(skip_locked=True)
)
_RECORD = insert(saga_history)
_STATE_COLUMNS = [c.name for c in saga_instances.c if c.name != "saga_id"]
_HISTORY_COLUMNS = [c.name for c in saga_history.c if c.name not in ("id", "saga_id")]


def _then_record(saga_write: Any) -> Any:
    """INSERT the history row from the RETURNING of `saga_write`: no row when it wrote none."""
    written = saga_write.returning(saga_instances.c.saga_id).cte("written")
    values = [bindparam(f"h_{name}", type_=saga_history.c[name].type) for name in _HISTORY_COLUMNS]
    return insert(saga_history).from_select(["saga_id", *_HISTORY_COLUMNS], select(written.c.saga_id, *values)).add_cte(written)


_STATE_VALUES = {name: bindparam(f"s_{name}", type_=saga_instances.c[name].type) for name in _STATE_COLUMNS}
_INSERT_RECORDED = _then_record(
    insert(saga_instances).values(saga_id=bindparam("b_saga_id", type_=saga_instances.c.saga_id.type), **_STATE_VALUES)
)
_UPDATE_RECORDED = _then_record(
    update(saga_instances)
    .where(saga_instances.c.saga_id == bindparam("b_saga_id"), saga_instances.c.version == bindparam("b_version"))
    .values(**_STATE_VALUES)
)
_COUNT_IN_FLIGHT = (
    select(func.count())
    .select_from(saga_instances)
    .where(saga_instances.c.status.in_([SagaStatus.RUNNING.value, SagaStatus.COMPENSATING.value]))
)


class SagaStore:
    def __init__(self, connection: AsyncConnection) -> None:
        self.connection = connection

    async def get(self, saga_id: str, *, lock: bool = True) -> SagaState | None:
        """Load a saga; on Postgres lock its row so concurrent replies queue, not conflict."""
        query = _SELECT_FOR_UPDATE if lock else _SELECT
        row = (await self.connection.execute(query, {"b_saga_id": saga_id})).one_or_none()
        return state_from_row(row) if row else None

    async def write(
        self, state: SagaState, deadline: Deadline | None, history: dict[str, Any], *, expected_version: int | None
    ) -> None:
        """Write a transition: state and deadline (INSERT when `expected_version` is None, a
        start; else a version-checked UPDATE) and its history row (a `history_entry`)."""
        if self.connection.dialect.name != "postgresql":
            if expected_version is None:
                await self.insert(state, deadline)
            else:
                await self.save(state, deadline, expected_version=expected_version)
            await self.record(state, history)
            return
        params = {f"s_{name}": value for name, value in (_columns(state) | _deadline_columns(deadline)).items()}
        params |= {f"h_{name}": value for name, value in history.items()}
        params["b_saga_id"] = state.saga_id
        if expected_version is None:
            await self.connection.execute(_INSERT_RECORDED, params)
            return
        params["b_version"] = expected_version
        result = await self.connection.execute(_UPDATE_RECORDED, params)
        if result.rowcount != 1:
            raise ConflictError(f"saga {state.saga_id} changed concurrently (expected version {expected_version})")

    async def insert(self, state: SagaState, deadline: Deadline | None) -> None:
        """Write a new saga with its active deadline (None: it has none)."""
        await self.connection.execute(_INSERT, {"saga_id": state.saga_id, **_columns(state), **_deadline_columns(deadline)})

    async def save(self, state: SagaState, deadline: Deadline | None, *, expected_version: int) -> None:
        """Write the new state and its deadline only if nobody else moved the saga since we read it."""
        result = await self.connection.execute(
            _UPDATE,
            {"b_saga_id": state.saga_id, "b_version": expected_version, **_columns(state), **_deadline_columns(deadline)},
        )
        if result.rowcount != 1:
            raise ConflictError(f"saga {state.saga_id} changed concurrently (expected version {expected_version})")

    async def record(self, state: SagaState, history: dict[str, Any]) -> None:
        """Add a history row of `state` (see `history_entry`)."""
        await self.connection.execute(_RECORD, {"saga_id": state.saga_id, **history})

    async def compensation_started_at(self, saga_id: str) -> datetime | None:
        """When the saga last began compensating (from its history)."""
        history = saga_history.c
        query = select(func.max(history.at)).where(
            history.saga_id == saga_id,
            history.to_status == SagaStatus.COMPENSATING.value,
            or_(history.from_status.is_(None), history.from_status != SagaStatus.COMPENSATING.value),
        )
        started: datetime | None = (await self.connection.execute(query)).scalar_one_or_none()
        return started

    async def clear_deadline(self, state: SagaState) -> None:
        """Drop a stale deadline: only the deadline columns, and only at the version read.

        A saga moved on since (a newer version) wrote its own deadline: leave that one.
        """
        await self.connection.execute(_CLEAR_DEADLINE, {"b_saga_id": state.saga_id, "b_version": state.version})

    async def due_deadlines(self, now: datetime, limit: int) -> list[tuple[SagaState, Deadline]]:
        """Claim sagas whose deadline is due, with their state, oldest deadline first.

        The claim locks the saga rows (FOR UPDATE, on PostgreSQL), so firing needs no
        second read. SKIP LOCKED lets several sweepers share the work, and skips a saga
        whose reply is being applied (that transaction holds the row and rewrites the
        deadline itself): it is swept next round if still due, never waited for.
        """
        rows = (await self.connection.execute(_DUE, {"b_now": now, "b_limit": limit})).all()
        return [(state_from_row(row), _deadline(row)) for row in rows]


def history_entry(
    state: SagaState,
    *,
    from_status: SagaStatus | None,
    trigger: str,
    note: str,
    step: str | None,
    message_id: str | None,
    causation_id: str | None,
    sent: Sequence[dict[str, str]],
) -> dict[str, Any]:
    """The history row of the transition to `state`, less its saga id."""
    return {
        "version": state.version,
        "at": state.updated_at,
        "trigger": trigger,
        "message_id": message_id,
        "causation_id": causation_id,
        "from_status": from_status.value if from_status else None,
        "to_status": state.status.value,
        "step": step,
        "note": note,
        "sent": json.dumps(list(sent)),
    }


async def count_in_flight(connection: AsyncConnection) -> int:
    """Sagas started and not yet finished (running or compensating)."""
    return int((await connection.execute(_COUNT_IN_FLIGHT)).scalar_one())


#: The statuses of sagas an operator may have to look at: unfinished, and compensation_failed.
ACTIVE_STATUSES = (SagaStatus.RUNNING, SagaStatus.COMPENSATING, SagaStatus.COMPENSATION_FAILED)


async def count_active(connection: AsyncConnection) -> dict[tuple[str, str], int]:
    """(saga type, status) -> number of sagas, for the statuses in ACTIVE_STATUSES."""
    c = saga_instances.c
    query = (
        select(c.definition, c.status, func.count())
        .where(c.status.in_([s.value for s in ACTIVE_STATUSES]))
        .group_by(c.definition, c.status)
    )
    return {(definition, status): int(count) for definition, status, count in (await connection.execute(query)).all()}
