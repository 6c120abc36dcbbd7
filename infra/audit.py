"""The audit trail: one row per operator action, from the console or the CLI.

Who (an operator's name, or the OS user / `COMPENSA_OPERATOR` for the CLI), when, by
which way in, the action (`dlq.replay`, `dlq.purge`, `dlq.prune`, `saga.retry`, `saga.cancel`,
`producers.add|revoke`, `operators.add|revoke`), its targets and parameters (the merge
patch of a replay, a cancel's reason) as JSON, and the outcome: `ok`, `refused` (the
action's own checks said no, with the reason), `denied` (the role may not act).
`record` writes a row on a connection the caller holds, so an action and its record
can commit together; `list_audit` is the read side, newest first, by keyset on the id.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Column, Index, String, Table, Text, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from contracts.columns import UtcDateTime
from outbox.tables import Id, metadata

OK, REFUSED, DENIED = "ok", "refused", "denied"
OUTCOMES = (OK, REFUSED, DENIED)
CONSOLE, CLI = "console", "cli"

#: Targets stored in full up to this many; beyond, the first ones and the count.
MAX_TARGETS = 1_000
#: The longest detail kept (a refusal's reason may quote a long payload).
DETAIL_LIMIT = 2_000

audit_log = Table(
    "audit_log",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("at", UtcDateTime(), nullable=False),
    Column("actor", String(128), nullable=False, doc="the operator's name (console) or the OS user / COMPENSA_OPERATOR (CLI)"),
    Column("via", String(16), nullable=False, doc="console or cli"),
    Column("action", String(64), nullable=False, doc="dlq.replay, dlq.purge, saga.retry, saga.cancel, producers.add, …"),
    Column("saga_id", String(64), nullable=True, doc="the one saga the action concerned, when it concerned one"),
    Column("targets", Text, nullable=False, doc="JSON list of what was acted on (dead-letter ids, a saga id, a name)"),
    Column("parameters", Text, nullable=False, doc="JSON object: the merge patch, the reason, the role, …"),
    Column("outcome", String(16), nullable=False, doc="ok, refused or denied"),
    Column("detail", Text, nullable=False, doc="what happened, or why it was refused"),
    Index("ix_audit_log_actor", "actor", "id"),
    Index("ix_audit_log_action", "action", "id"),
    Index("ix_audit_log_saga", "saga_id", "id"),
)


def cli_actor(configured: str | None = None) -> str:
    """Who a CLI action is recorded as: COMPENSA_OPERATOR (settings.operator), else the OS user."""
    if configured:
        return configured[:128]
    with contextlib.suppress(Exception):  # getpass raises OSError or KeyError with no passwd entry
        return getpass.getuser()[:128]
    return f"uid:{os.getuid()}"


def only_saga(saga_ids: Iterable[str | None]) -> str | None:
    """The saga an action's targets all name (dead letters of one saga), else None: its audit row's saga_id."""
    sagas = set(saga_ids)
    return sagas.pop() if len(sagas) == 1 else None


def _targets(targets: Sequence[Any]) -> list[Any]:
    items = list(targets)
    if len(items) <= MAX_TARGETS:
        return items
    return [*items[:MAX_TARGETS], f"… and {len(items) - MAX_TARGETS} more"]


async def record(
    connection: AsyncConnection,
    *,
    at: datetime,
    actor: str,
    via: str,
    action: str,
    targets: Sequence[Any],
    parameters: dict[str, Any] | None = None,
    outcome: str = OK,
    detail: str = "",
    saga_id: str | None = None,
) -> None:
    """Write one audit row on `connection` (in the caller's transaction)."""
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown outcome {outcome!r}")
    await connection.execute(
        insert(audit_log).values(
            at=at,
            actor=actor[:128],
            via=via,
            action=action,
            saga_id=saga_id[:64] if saga_id else None,
            targets=json.dumps(_targets(targets), default=str),
            parameters=json.dumps(parameters or {}, sort_keys=True, default=str),
            outcome=outcome,
            detail=detail[:DETAIL_LIMIT],
        )
    )


async def record_now(engine: AsyncEngine, **fields: Any) -> None:
    """Write one audit row in a transaction of its own."""
    async with engine.begin() as connection:
        await record(connection, **fields)


@dataclass(frozen=True)
class AuditFilter:
    actor: str | None = None
    action: str | None = None
    saga_id: str | None = None
    outcome: str | None = None


def _row(row: Any) -> dict[str, Any]:
    data = dict(row._mapping)
    for name in ("targets", "parameters"):
        with contextlib.suppress(ValueError, RecursionError):
            data[name] = json.loads(data[name])
    return data


async def list_audit(
    connection: AsyncConnection, where: AuditFilter = AuditFilter(), *, before_id: int | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    """Audit rows, newest first; `before_id` continues a page (keyset on the id)."""
    a = audit_log.c
    query = select(audit_log).order_by(a.id.desc()).limit(limit)
    if before_id is not None:
        query = query.where(a.id < before_id)
    if where.actor:
        query = query.where(a.actor == where.actor)
    if where.action:
        query = query.where(a.action == where.action)
    if where.saga_id:
        query = query.where(a.saga_id == where.saga_id)
    if where.outcome:
        query = query.where(a.outcome == where.outcome)
    return [_row(row) for row in (await connection.execute(query)).all()]
