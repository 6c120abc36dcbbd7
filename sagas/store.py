"""Load and save saga state on the orchestrator's connection, with optimistic locking."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from contracts import ConflictError
from sagas.state import Deadline, SagaState, SagaStatus
from sagas.tables import saga_deadlines, saga_history, saga_instances


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
_SELECT_SKIP_LOCKED = _SELECT.with_for_update(skip_locked=True)
_INSERT = insert(saga_instances)
_UPDATE = update(saga_instances).where(
    saga_instances.c.saga_id == bindparam("b_saga_id"), saga_instances.c.version == bindparam("b_version")
)
_RECORD = insert(saga_history)
_CLEAR_DEADLINE = delete(saga_deadlines).where(saga_deadlines.c.saga_id == bindparam("b_saga_id"))
_SET_DEADLINE = insert(saga_deadlines)
_COUNT_IN_FLIGHT = (
    select(func.count())
    .select_from(saga_instances)
    .where(saga_instances.c.status.in_([SagaStatus.RUNNING.value, SagaStatus.COMPENSATING.value]))
)


class SagaStore:
    def __init__(self, connection: AsyncConnection) -> None:
        self.connection = connection

    async def get(self, saga_id: str, *, lock: bool = True, skip_locked: bool = False) -> SagaState | None:
        """Load a saga; on Postgres lock its row so concurrent replies queue, not conflict.

        With `skip_locked`, a saga another transaction holds comes back as None.
        """
        query = _SELECT if not lock else _SELECT_SKIP_LOCKED if skip_locked else _SELECT_FOR_UPDATE
        row = (await self.connection.execute(query, {"b_saga_id": saga_id})).one_or_none()
        return state_from_row(row) if row else None

    async def insert(self, state: SagaState) -> None:
        await self.connection.execute(_INSERT, {"saga_id": state.saga_id, **_columns(state)})

    async def save(self, state: SagaState, *, expected_version: int) -> None:
        """Write the new state only if nobody else moved the saga since we read it."""
        result = await self.connection.execute(
            _UPDATE, {"b_saga_id": state.saga_id, "b_version": expected_version, **_columns(state)}
        )
        if result.rowcount != 1:
            raise ConflictError(f"saga {state.saga_id} changed concurrently (expected version {expected_version})")

    async def record(
        self,
        state: SagaState,
        *,
        from_status: SagaStatus | None,
        trigger: str,
        note: str,
        step: str | None,
        message_id: str | None,
        causation_id: str | None,
        sent: Sequence[dict[str, str]],
    ) -> None:
        await self.connection.execute(
            _RECORD,
            {
                "saga_id": state.saga_id,
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
            },
        )

    async def set_deadline(self, saga_id: str, deadline: Deadline | None) -> None:
        await self.connection.execute(_CLEAR_DEADLINE, {"b_saga_id": saga_id})
        if deadline is not None:
            await self.connection.execute(
                _SET_DEADLINE,
                {
                    "saga_id": saga_id,
                    "due_at": deadline.due_at,
                    "kind": deadline.kind,
                    "step": deadline.step,
                    "attempt": deadline.attempt,
                },
            )

    async def due_deadlines(self, now: datetime, limit: int) -> list[tuple[str, Deadline]]:
        """Claim due deadlines; SKIP LOCKED lets several sweepers share the work."""
        rows = (
            await self.connection.execute(
                select(saga_deadlines)
                .where(saga_deadlines.c.due_at <= now)
                .order_by(saga_deadlines.c.due_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
        ).all()
        return [(row.saga_id, Deadline(due_at=row.due_at, kind=row.kind, step=row.step, attempt=row.attempt)) for row in rows]


async def count_in_flight(connection: AsyncConnection) -> int:
    """Sagas started and not yet finished (running or compensating)."""
    return int((await connection.execute(_COUNT_IN_FLIGHT)).scalar_one())
