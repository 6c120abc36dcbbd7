"""`compensa saga list|show|retry|cancel`: inspect sagas and act on one as an operator.

The rows come from the read side (`sagas/queries.py`, and `infra/saga_starts.py` for
orders that never got a saga); this module only formats them.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer
from rich.text import Text

from infra.cli.common import (
    AppOpt,
    JsonOpt,
    cell,
    clip,
    command,
    confirm,
    console,
    database,
    detail_table,
    fail,
    load_app_or_exit,
    one_line_table,
    open_engine,
    parse_duration,
    print_json,
    unwrapped,
    visible,
    when,
)

app = typer.Typer(help="Saga inspection.", no_args_is_help=True)

#: The status `saga list --stuck-for` shows for an order that has no saga.
NO_SAGA = "no saga"


@app.command("list")
@command
async def saga_list(
    status: Annotated[str | None, typer.Option(help="Only sagas in this status.")] = None,
    older_than: Annotated[
        str | None, typer.Option("--older-than", help="Only sagas started longer ago than this (30s, 10m, 2h, 1d).")
    ] = None,
    stuck_for: Annotated[
        str | None,
        typer.Option(
            "--stuck-for",
            help="Only unfinished sagas not updated for this long, and orders with no saga after it (status 'no saga').",
        ),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
    as_json: JsonOpt = False,
    app: AppOpt = None,
) -> None:
    """List the hosted app's sagas (the order saga's without --app), newest first."""
    from infra.apps import ORDER_APP
    from infra.saga_starts import orders_without_saga
    from sagas import SagaStatus
    from sagas.queries import list_sagas

    hosted = load_app_or_exit(app, as_json=as_json)

    if status is not None and status not in {x.value for x in SagaStatus}:
        fail(f"unknown status {clip(status)}; choose from {', '.join(x.value for x in SagaStatus)}")
    now = datetime.now(UTC)
    started = parse_duration(older_than, "--older-than") if older_than else None
    stuck = parse_duration(stuck_for, "--stuck-for") if stuck_for else None
    engine = open_engine()
    try:
        async with engine.connect() as connection:
            rows = await list_sagas(
                connection,
                status=status,
                started_before=now - started if started is not None else None,
                unfinished_since=now - stuck if stuck is not None else None,
                # Apps may share one database: list the hosted app's sagas only.
                definitions=[definition.name for definition in hosted.sagas],
                limit=limit,
            )
            # An order that never got a saga is stuck too, and no saga row would show it (the
            # order app knows where orders enter; another app's starts come from upstream).
            unstarted = None
            if stuck is not None and status is None and hosted is ORDER_APP:
                bound = max(stuck, started or timedelta(0))
                unstarted = await orders_without_saga(connection, now, bound, limit)
    finally:
        await engine.dispose()
    if unstarted is not None:
        rows += [_unstarted_row(u, bound) for u in unstarted.orders()]
    if as_json:
        print_json(rows)
        return
    # Saga ids are never cut (`saga show` needs them whole); the other columns shrink to fit.
    console.print(
        one_line_table(
            ["saga", "status", "step", "reason", "started (UTC)", "updated (UTC)"],
            [
                [
                    r["saga_id"],
                    r["status"],
                    "-" if r["step"] is None else r["step"],
                    " ".join((r["reason"] or "").split()),
                    when(r["started_at"]),
                    when(r["updated_at"]),
                ]
                for r in rows
            ],
            width=console.width,
            keep=("saga",),
            hide=("step", "started (UTC)", "updated (UTC)"),
        )
    )
    if unstarted is not None and not unstarted.none:
        console.print(
            cell(
                f"orders with no saga after {_seconds(bound)}: {unstarted.pending_count} pending, "
                f"{unstarted.sent_count} order.created sent (status {NO_SAGA!r} above); is the saga service running? "
                "`compensa health` says more"
            )
        )


def _seconds(bound: timedelta) -> str:
    return f"{bound.total_seconds():g}s"


def _unstarted_row(order: Any, bound: timedelta) -> dict[str, Any]:
    """A `saga list` row for an order without a saga: its id whole, where it was seen."""
    came = "pending order" if order.pending_order else f"order.created sent from the {order.source} outbox"
    return {
        "saga_id": order.order_id,
        "status": NO_SAGA,
        "step": None,
        "reason": f"{came}, no saga after {_seconds(bound)}",
        "started_at": order.entered_at,
        "updated_at": order.entered_at,
    }


@app.command("show")
@command
async def saga_show(
    saga_id: str,
    as_json: JsonOpt = False,
    mermaid: Annotated[bool, typer.Option("--mermaid", help="Print a Mermaid sequence diagram.")] = False,
    app: AppOpt = None,
) -> None:
    """Show a saga's state and every transition, in order."""
    from sagas.queries import get_saga, saga_history

    hosted = load_app_or_exit(app, as_json=as_json)

    engine = open_engine()
    try:
        async with engine.connect() as connection:
            saga = await get_saga(connection, saga_id)
            if saga is None:
                fail(f"no saga {clip(saga_id)}; `compensa saga list` shows the known ones")
                raise AssertionError("unreachable")
            history = await saga_history(connection, saga_id)
    finally:
        await engine.dispose()
    if as_json:
        print_json({"saga": saga, "history": history})
        return
    if mermaid:
        # A document: never wrapped to the terminal's width.
        sys.stdout.write(_mermaid(saga_id, history, _participants_of(hosted)) + "\n")
        return
    # Stored values are shown as Text: never parsed as markup, invisible characters escaped.
    console.print(
        Text.assemble(
            f"saga {visible(saga_id)}: ",
            (visible(saga["status"]), "bold"),
            f" (version {saga['version']}) {visible(saga['reason'] or '')}",
        )
    )
    table = detail_table("v", "at (UTC)", "trigger", "message", "causation", "from → to", "sent", "note")
    for e in history:
        table.add_row(
            cell(e["version"]),
            when(e["at"]),
            cell(e["trigger"]),
            cell((e["message_id"] or "-")[:8]),
            cell((e["causation_id"] or "-")[:8]),
            cell(f"{e['from_status'] or '-'} → {e['to_status']}"),
            cell(", ".join(_sent_types(e["sent"])) or "-"),
            cell(e["note"]),
        )
    console.print(table)


def _sent_types(sent: Any) -> list[str]:
    """Types of the messages a transition sent (its `sent` column, parsed when it parses)."""
    if not isinstance(sent, list):
        return [str(sent)]
    return [str(x.get("type")) if isinstance(x, dict) else str(x) for x in sent]


#: The order app's diagram participants, by the first word of a trigger or message type.
ORDER_PARTICIPANTS = {"stock": "Stock", "payment": "Payments", "order": "Orders", "deadline": "Clock", "operator": "Operator"}


def _participants_of(app: Any) -> dict[str, str]:
    """Diagram participants by the first word of a message type: each participant's, from what it consumes."""
    from infra.apps import ORDER_APP

    if app is ORDER_APP:
        return ORDER_PARTICIPANTS
    named = {t.split(".")[0]: p.name.capitalize() for p in app.participants for t in p.message_types()}
    return named | {"deadline": "Clock", "operator": "Operator"}


def _mermaid(saga_id: str, history: list[dict[str, Any]], participant_of: dict[str, str] = ORDER_PARTICIPANTS) -> str:
    lines = ["sequenceDiagram", "    participant Saga as Saga " + visible(saga_id)]
    for entry in history:
        source = participant_of.get(entry["trigger"].split(".")[0].split(":")[0], "Broker")
        lines.append(visible(f"    {source}->>Saga: {entry['trigger']} ({entry['from_status'] or 'new'} → {entry['to_status']})"))
        for kind in _sent_types(entry["sent"]):
            target = participant_of.get(kind.split(".")[0], "Broker")
            lines.append(f"    Saga->>{target}: {visible(kind)}")
    return "\n".join(lines)


@app.command("retry")
@command
async def saga_retry(
    saga_id: Annotated[str, typer.Argument(metavar="ID", help="Saga (order) id.")],
    as_json: JsonOpt = False,
    app: AppOpt = None,
) -> None:
    """Resend the pending compensations of a compensation_failed saga, with a fresh budget."""
    await _saga_action(
        load_app_or_exit(app, as_json=as_json),
        saga_id,
        lambda orchestrator, uow: orchestrator.retry_compensation(uow, saga_id),
        hint="`compensa saga list --status compensation_failed` shows the sagas to retry",
        was="compensation_failed",
        sent_verb="resent",
        as_json=as_json,
        kind="retry",
    )


@app.command("cancel")
@command
async def saga_cancel(
    saga_id: Annotated[str, typer.Argument(metavar="ID", help="Saga (order) id.")],
    reason: Annotated[str, typer.Option(help="Why (required): recorded in the saga's history and on the order.")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    as_json: JsonOpt = False,
    app: AppOpt = None,
) -> None:
    """Cancel a running saga: compensate what it did (release stock, refund), then cancel the order."""
    if not reason.strip():
        raise typer.BadParameter("give a reason; it is recorded in the history", param_hint="--reason")
    hosted = load_app_or_exit(app, as_json=as_json)
    if not yes:
        confirm(f"cancel saga {saga_id} and compensate what it did", declined="nothing cancelled")
    await _saga_action(
        hosted,
        saga_id,
        lambda orchestrator, uow: orchestrator.cancel(uow, saga_id, reason.strip()),
        hint=f"`compensa saga show {saga_id}` shows where it is",
        was="running",
        sent_verb="sent",
        as_json=as_json,
        kind="cancel",
        parameters={"reason": reason.strip()},
    )


async def _saga_action(
    hosted: Any,
    saga_id: str,
    action: Callable[[Any, Any], Awaitable[Any]],
    *,
    hint: str,
    was: str,
    sent_verb: str,
    as_json: bool,
    kind: str,
    parameters: dict[str, Any] | None = None,
) -> None:
    """Apply an operator action through the orchestrator in one unit of work, and report it."""
    from contracts import BusinessRuleError
    from infra import audit
    from infra.bootstrap import orchestrator_for
    from infra.clock import SystemClock
    from infra.settings import get_settings
    from outbox.uow import UnitOfWork

    settings = get_settings()
    orchestrator = orchestrator_for(settings, app=hosted)
    clock = SystemClock()
    record: dict[str, Any] = {
        "actor": audit.cli_actor(settings.operator),
        "via": audit.CLI,
        "action": f"saga.{kind}",
        "targets": [saga_id],
    }
    record |= {"parameters": parameters or {}, "saga_id": saga_id}
    async with database() as engine:
        async with UnitOfWork(engine, "saga", clock) as uow:
            refused: str | None = None
            try:
                transition = await action(orchestrator, uow)
            except BusinessRuleError as exc:
                refused = str(exc)
            else:
                sent_types = ", ".join(payload.message_type for payload in transition.outgoing) or "nothing"
                # The audit row commits with the transition.
                await audit.record(
                    uow.connection,
                    at=clock.now(),
                    detail=f"now {transition.state.status.value}; sent {sent_types}",
                    **record,
                )
                await uow.commit()
        if refused is not None:
            await audit.record_now(engine, at=clock.now(), outcome=audit.REFUSED, detail=refused, **record)
            fail(f"{refused}; {hint}")
    sent = [payload.message_type for payload in transition.outgoing]
    result = {
        "saga_id": saga_id,
        "status": transition.state.status.value,
        "trigger": transition.trigger,
        "note": transition.note,
        "sent": sent,
    }
    if as_json:
        print_json(result)
        return
    unwrapped.print(
        cell(
            f"saga {saga_id}: {was} → {result['status']}; "
            + (f"{sent_verb} {', '.join(sent)} (a running relay delivers them)" if sent else transition.note)
        )
    )
