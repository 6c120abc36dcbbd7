"""The console's operator actions, each recorded in the audit trail.

They call what the CLI calls: `infra.dlq.replay.replay` (dry run and replay, with a
merge patch validated against the contract), `infra.dlq.query.purge`, and the
orchestrator's `retry_compensation` / `cancel` in one unit of work on the saga
outbox, whose audit row commits in the same transaction. Each runs in a span
(`operator <action>`); a saga action's is in the saga's own trace, so the commands it
sends carry the order's trace on.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts import BusinessRuleError, json_depth
from contracts.clock import Clock
from infra import audit
from infra import topology as t
from infra.dlq.query import DeadLetterFilter, get_dead_letter, missing_ids, purge, saga_ids_of
from infra.dlq.replay import Outcome, ReplaySummary, replay
from sagas.queries import saga_summary

tracer = trace.get_tracer("compensa")

#: Bounds of an edit (the CLI's `--edit` has the same).
MAX_PATCH_BYTES = 1 << 20
MAX_PATCH_DEPTH = 32
#: Dead letters one action may name (the CLI's bound too).
MAX_IDS = 10_000
#: Diffs shown by a dry run with an edit.
MAX_DIFFS = 20


class Refused(ValueError):
    """An action the console does not carry out, with the reason the operator reads."""


def _strict_int(digits: str) -> int:
    if len(digits.lstrip("-")) > 19 or not -(2**63) <= int(digits) < 2**63:
        raise ValueError(f"the integer {digits[:30]} does not fit in 64 bits")
    return int(digits)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_patch(text: str) -> dict[str, Any] | None:
    """An edit as typed: empty is no edit; else a JSON merge patch (an object), bounded."""
    if not text.strip():
        return None
    if len(text.encode()) > MAX_PATCH_BYTES:
        raise Refused(f"the edit is larger than {MAX_PATCH_BYTES:,} bytes; a merge patch of one payload is small")
    depth = json_depth(text)
    if depth > MAX_PATCH_DEPTH:
        raise Refused(f"the edit nests {depth:,} levels deep; a merge patch may nest at most {MAX_PATCH_DEPTH}")
    try:
        patch = json.loads(text, parse_int=_strict_int, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise Refused(
            f'the edit is not valid JSON ({exc}); give a JSON merge patch, e.g. {{"payment_token": "tok_ok_1"}}'
        ) from exc
    except (ValueError, RecursionError) as exc:
        raise Refused(f"the edit: {exc}") from exc
    if not isinstance(patch, dict):
        raise Refused("the edit must be a JSON object: a merge patch of the payload")
    return patch


def ids_text(ids: Sequence[int]) -> str:
    """Ids as runs (`1-3,7`), every one of them: what a confirmation form carries."""
    runs: list[list[int]] = []
    for i in sorted(set(ids)):
        if runs and runs[-1][1] + 1 == i:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def parse_ids(values: Sequence[str]) -> list[int]:
    """Dead-letter ids from form values (`12`, `12,13`, `20-25`), at most MAX_IDS."""
    ids: list[int] = []
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            match = re.fullmatch(r"([0-9]{1,18})(?:-([0-9]{1,18}))?", part)
            if match is None:
                raise Refused(f"bad dead-letter id {part[:40]!r}: ids are numbers (12, 12,13 or 20-25)")
            low = int(match.group(1))
            high = int(match.group(2) or low)
            if high < low:
                raise Refused(f"bad id range {part!r}: the first id is the lower one")
            if len(ids) + high - low + 1 > MAX_IDS:
                raise Refused(f"at most {MAX_IDS:,} dead letters per action; narrow the selection")
            ids.extend(range(low, high + 1))
    return list(dict.fromkeys(ids))


def consequence(outcome: Outcome, saga: dict[str, Any] | None) -> str:
    """What the replay of this dead letter would do to its saga, in a sentence."""
    if outcome.action in ("skipped", "refused"):
        return "nothing: not sent"
    sent = f"{outcome.type} goes back to {outcome.queue}"
    if saga is None:
        return f"{sent}; the message names no saga"
    status = saga.get("status")
    if status is None:
        return f"{sent}; no saga {saga['saga_id']} exists (never started)"
    if status in ("running", "compensating"):
        return f"{sent}; saga {saga['saga_id']} is {status} at step {saga['step']} and goes on when the reply arrives"
    if status == "compensation_failed":
        return f"{sent}; saga {saga['saga_id']} is compensation_failed: a reply is a late one (retry the saga to resume it)"
    return f"{sent}; saga {saga['saga_id']} is already {status}: a reply it causes is late and undone (refund or release)"


@dataclass
class Preview:
    """A dry run: what each dead letter would do, what its saga would see, and the edit's diffs."""

    summary: ReplaySummary
    sagas: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    saga_of: dict[int, str | None] = field(default_factory=dict)
    diffs: dict[int, str] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        rows = []
        for outcome in self.summary.outcomes:
            saga_id = self.saga_of.get(outcome.id)
            saga = self.sagas.get(saga_id) if saga_id else None
            rows.append(
                {
                    "outcome": outcome,
                    "saga_id": saga_id,
                    "saga_status": saga.get("status") if saga else None,
                    "consequence": consequence(outcome, saga if saga_id else None),
                }
            )
        return rows

    @property
    def replayable(self) -> list[int]:
        return [o.id for o in self.summary.outcomes if o.action == "would_replay"]


def _pretty(value: Any) -> list[str]:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str).splitlines()


async def preview_replay(
    engine: AsyncEngine,
    clock: Clock,
    ids: Sequence[int],
    patch: dict[str, Any] | None,
    queues: Mapping[str, t.QueueSpec] | None = None,
) -> Preview:
    """The dry run of a replay to `queues` (the hosted app's work queues, by name): nothing is written."""
    if not ids:
        raise Refused("no dead letters selected")
    async with engine.connect() as connection:
        missing = await missing_ids(connection, ids)
        if missing:
            raise Refused(f"no dead letter {', '.join(map(str, missing[:10]))}")
    summary = await replay(engine, clock, ids, patch=patch, dry_run=True, queues=queues)
    preview = Preview(summary)
    async with engine.connect() as connection:
        preview.saga_of = await saga_ids_of(connection, ids)
        for saga_id in sorted({s for s in preview.saga_of.values() if s})[:500]:
            preview.sagas[saga_id] = await saga_summary(connection, saga_id, transitions=0)
        if patch is not None:
            for outcome in summary.outcomes:
                if outcome.action != "would_replay" or len(preview.diffs) >= MAX_DIFFS:
                    continue
                letter = await get_dead_letter(connection, outcome.id)
                body = letter["body"] if letter else None
                before = body.get("payload") if isinstance(body, dict) else body
                preview.diffs[outcome.id] = "\n".join(
                    difflib.unified_diff(
                        _pretty(before), _pretty(outcome.payload), "stored payload", "edited payload", lineterm=""
                    )
                )
    return preview


async def replay_now(
    engine: AsyncEngine,
    clock: Clock,
    ids: Sequence[int],
    patch: dict[str, Any] | None,
    actor: str,
    queues: Mapping[str, t.QueueSpec] | None = None,
) -> ReplaySummary:
    """Replay the dead letters (what the dry run showed) to `queues` and record it."""
    if not ids:
        raise Refused("no dead letters selected")
    async with engine.connect() as connection:
        saga_of = await saga_ids_of(connection, ids)
    # A replayed message keeps its own trace context (it is the message that failed, sent again).
    with tracer.start_as_current_span(
        "operator dlq.replay",
        attributes={"compensa.action": "dlq.replay", "compensa.operator": actor, "compensa.dead_letters": len(ids)},
    ):
        summary = await replay(engine, clock, ids, patch=patch, queues=queues)
    outcome = audit.OK if summary.replayed else audit.REFUSED
    refusals = [f"{o.id}: {o.detail}" for o in summary.outcomes if o.action == "refused"][:5]
    detail = f"replayed {summary.replayed}, skipped {summary.skipped}, refused {summary.refused}"
    if refusals:
        detail += " (" + "; ".join(refusals) + ")"
    await audit.record_now(
        engine,
        at=clock.now(),
        actor=actor,
        via=audit.CONSOLE,
        action="dlq.replay",
        targets=list(ids),
        parameters={"patch": patch} if patch is not None else {},
        outcome=outcome,
        detail=detail,
        saga_id=audit.only_saga(saga_of.values()),
    )
    return summary


async def purge_now(engine: AsyncEngine, clock: Clock, ids: Sequence[int], actor: str) -> int:
    if not ids:
        raise Refused("no dead letters selected")
    async with engine.connect() as connection:
        missing = await missing_ids(connection, ids)
        if missing:
            raise Refused(f"no dead letter {', '.join(map(str, missing[:10]))}")
        saga_of = await saga_ids_of(connection, ids)
    purged = await purge(engine, DeadLetterFilter(ids=tuple(ids)), clock.now())
    await audit.record_now(
        engine,
        at=clock.now(),
        actor=actor,
        via=audit.CONSOLE,
        action="dlq.purge",
        targets=list(ids),
        outcome=audit.OK,
        detail=f"purged {purged} of {len(ids)} (the others were purged already)",
        saga_id=audit.only_saga(saga_of.values()),
    )
    return purged


async def _in_saga_trace(uow: Any, saga_id: str, action: str, actor: str) -> Any:
    """The span of an operator's saga action, in the saga's own trace (as a fired deadline's is).

    Its compensations stay in the trace the order began (found in the saga's newest
    outgoing message); the commands it sends carry it as their traceparent.
    """
    return tracer.start_as_current_span(
        f"operator {action}",
        context=await uow.trace_context_of(saga_id),
        attributes={"compensa.saga_id": saga_id, "compensa.action": action, "compensa.operator": actor},
    )


async def saga_action(
    engine: AsyncEngine, clock: Clock, orchestrator: Any, saga_id: str, kind: str, actor: str, reason: str = ""
) -> Any:
    """Retry or cancel a saga through the orchestrator; the audit row commits with the transition.

    A refusal (the saga is not in a state for it) raises Refused after recording it.
    """
    from outbox.uow import UnitOfWork

    parameters = {"reason": reason} if kind == "cancel" else {}
    try:
        async with UnitOfWork(engine, "saga", clock) as uow:
            with await _in_saga_trace(uow, saga_id, f"saga.{kind}", actor):
                if kind == "retry":
                    transition = await orchestrator.retry_compensation(uow, saga_id)
                else:
                    transition = await orchestrator.cancel(uow, saga_id, reason)
            sent = [payload.message_type for payload in transition.outgoing]
            await audit.record(
                uow.connection,
                at=clock.now(),
                actor=actor,
                via=audit.CONSOLE,
                action=f"saga.{kind}",
                targets=[saga_id],
                parameters=parameters,
                outcome=audit.OK,
                detail=f"now {transition.state.status.value}; sent {', '.join(sent) or 'nothing'}",
                saga_id=saga_id,
            )
            await uow.commit()
    except BusinessRuleError as exc:
        await audit.record_now(
            engine,
            at=clock.now(),
            actor=actor,
            via=audit.CONSOLE,
            action=f"saga.{kind}",
            targets=[saga_id],
            parameters=parameters,
            outcome=audit.REFUSED,
            detail=str(exc),
            saga_id=saga_id,
        )
        raise Refused(str(exc)) from exc
    return transition
