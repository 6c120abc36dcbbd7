"""`compensa dlq list|show|replay|purge|prune`: the archive of failed messages.

Queries live in `infra/dlq/query.py` (and `sagas/queries.py` for a dead letter's saga);
replay in `infra/dlq/replay.py`. This module parses the operator's input and formats.
With `--app` the app's queues are the ones `--queue` names and replays go back to, and
its message types are known to `--type` and to replay's contract check; the archive is
one table, so listings show every dead letter a filter matches, whichever app it came from,
and `prune` (which takes no filter) covers the whole archive whatever `--app` says.
Every action (replay, purge, prune) writes an audit row; one that concerns the dead
letters of a single saga names it (`audit list --saga`, the console's saga page).
"""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from infra.cli.common import (
    MAX_ID,
    AppOpt,
    JsonOpt,
    audited,
    cell,
    clip,
    command,
    confirm,
    database,
    detail_table,
    err,
    fail,
    json_view,
    load_app_or_exit,
    one_line_table,
    parse_dead_letter_id,
    parse_duration,
    parse_ids,
    parse_time,
    print_json,
    visible,
    when,
)
from infra.cli.common import unwrapped as console

if TYPE_CHECKING:
    from infra.apps import Footprint

app = typer.Typer(
    help="Dead letters: the archive of failed messages (list, show, replay, purge).",
    no_args_is_help=True,
)


def _filter(
    ids: tuple[int, ...] = (),
    *,
    queue: str | None,
    type_: str | None,
    reason_class: str | None,
    saga: str | None,
    since: str | None,
    until: str | None,
    status: str | None,
    hosted: Footprint,
) -> Any:
    from contracts import REGISTRY
    from infra.dlq.query import DeadLetterFilter
    from infra.dlq.tables import STATUSES, UNDECODABLE

    now = datetime.now(UTC)
    known_queues = hosted.queue_names
    if queue is not None and queue not in known_queues:
        fail(f"--queue: unknown queue {clip(queue)}; choose from {', '.join(known_queues)}")
    known_types = [*REGISTRY.types(), UNDECODABLE]
    if type_ is not None and type_ not in known_types:
        fail(f"--type: unknown message type {clip(type_)}; choose from {', '.join(known_types)}")
    if status is not None and status not in STATUSES:
        fail(f"--status: unknown status {clip(status)}; choose from {', '.join(STATUSES)}")
    if reason_class is not None and not reason_class.strip():
        fail("--reason-class: empty; `compensa dlq list --group` shows the reason classes")
    for option, value in (("--reason-class", reason_class), ("--saga", saga)):
        if value is not None and len(value) > 64:
            fail(f"{option}: {clip(value)} is longer than 64 characters, the most the archive stores")
    return DeadLetterFilter(
        ids=ids,
        queue=queue,
        type=type_,
        reason_class=reason_class,
        saga_id=saga,
        since=parse_time(since, "--since", now) if since else None,
        until=parse_time(until, "--until", now) if until else None,
        status=status,
    )


QueueOpt = Annotated[str | None, typer.Option("--queue", "-q", help="Work queue the message failed on (e.g. stock.commands).")]
TypeOpt = Annotated[str | None, typer.Option("--type", "-t", help="Message type (e.g. stock.reserve, or <undecodable>).")]
ReasonOpt = Annotated[
    str | None, typer.Option("--reason-class", "-r", help="Reason class (contract, handler_error, transient_exhausted, …).")
]
SagaOpt = Annotated[str | None, typer.Option("--saga", help="Saga (order) id.")]
SinceOpt = Annotated[str | None, typer.Option("--since", help="Failed at or after: ISO time, or a duration ago (2h).")]
UntilOpt = Annotated[str | None, typer.Option("--until", help="Failed before: ISO time, or a duration ago.")]
StatusOpt = Annotated[str | None, typer.Option("--status", help="new, replayed or purged.")]
IdsArg = Annotated[list[str] | None, typer.Argument(metavar="[ID]...", help="Dead-letter ids (12, 12,13 or 20-25).")]
AllOpt = Annotated[bool, typer.Option("--all", help="Every dead letter with status new.")]


def _short(value: Any, width: int) -> str:
    text = "" if value is None else str(value)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


# ---------------------------------------------------------------- dlq list / show


@app.command("list")
@command
async def dlq_list(
    queue: QueueOpt = None,
    type_: TypeOpt = None,
    reason_class: ReasonOpt = None,
    saga: SagaOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    status: StatusOpt = None,
    group: Annotated[bool, typer.Option("--group", help="Counts per queue × reason class instead of rows.")] = False,
    limit: Annotated[int, typer.Option(min=1, max=1_000_000, help="Rows to show, most recent failure first.")] = 50,
    as_json: JsonOpt = False,
    app: AppOpt = None,
) -> None:
    """List archived dead letters (most recent failure first), or failure groups with --group."""
    from infra.dlq.query import count_dead_letters, failure_groups, list_dead_letters

    hosted = _hosted(app, as_json)
    where = _filter(
        queue=queue, type_=type_, reason_class=reason_class, saga=saga, since=since, until=until, status=status, hosted=hosted
    )
    async with database() as engine, engine.connect() as connection:
        if group:
            groups = await failure_groups(connection, where)
        else:
            rows = await list_dead_letters(connection, where, limit=limit)
            total = await count_dead_letters(connection, where)
    if group:
        if as_json:
            print_json(groups)
            return
        console.print(
            one_line_table(
                ["queue", "reason class", "count", "sagas", "first failure", "last failure", "example reason"],
                [
                    [
                        g["queue"],
                        g["reason_class"],
                        g["count"],
                        g["sagas"],
                        when(g["first_failure_at"], short=True),
                        when(g["last_failure_at"], short=True),
                        _short(g["example_reason"], 200),
                    ]
                    for g in groups
                ],
                width=console.width,
                keep=("queue", "reason class"),
                hide=("sagas", "first failure", "last failure"),
                title=f"failure groups ({where.describe()})",
            )
        )
        if not groups:
            console.print("no dead letters match", highlight=False)
        return
    if as_json:
        print_json({"total": total, "dead_letters": rows})
        return
    console.print(
        one_line_table(
            ["id", "failed (UTC)", "queue", "type", "saga", "reason class", "att", "status", "reason"],
            [
                [
                    r["id"],
                    when(r["last_failure_at"], short=True),
                    r["queue"],
                    r["type"],
                    r["saga_id"] or "-",
                    r["reason_class"],
                    r["attempts"],
                    r["status"],
                    _short(r["reason"], 200),
                ]
                for r in rows
            ],
            width=console.width,
            keep=("id", "saga"),
            hide=("att", "status", "failed (UTC)", "queue", "type", "reason class"),
        )
    )
    shown = f"{len(rows)} of {total}" if total > len(rows) else str(total)
    console.print(cell(f"{shown} dead letters ({where.describe()}); `compensa dlq show ID` for one in full"))


@app.command("show")
@command
async def dlq_show(
    dead_letter_id: Annotated[str, typer.Argument(metavar="ID", help="Dead-letter id (from `dlq list`).")],
    as_json: JsonOpt = False,
    app: AppOpt = None,
) -> None:
    """Show one dead letter: reason, headers, payload, and where its saga stands."""
    from infra.dlq.query import get_dead_letter
    from infra.dlq.tables import UNDECODABLE
    from sagas.queries import saga_summary

    _hosted(app, as_json)  # an --app that does not load is refused here too, as by the other dlq commands
    number = parse_dead_letter_id(dead_letter_id.strip())
    if number is None:
        fail(f"bad dead-letter id {clip(dead_letter_id)}: ids are numbers from 0 to {MAX_ID}; `compensa dlq list` shows them")
    async with database() as engine, engine.connect() as connection:
        letter = await get_dead_letter(connection, number)
        if letter is None:
            fail(f"no dead letter {number}; `compensa dlq list` shows them")
        saga = await saga_summary(connection, letter["saga_id"])
    if as_json:
        print_json({"dead_letter": letter, "saga": saga})
        return
    # Everything below comes from the archive: printed as Text (never markup), invisible characters escaped.
    version = f" v{letter['version']}" if letter["version"] else ""
    console.print(Text.assemble((f"dead letter {letter['id']}", "bold"), f"  status {visible(letter['status'])}"))
    facts = Table.grid(padding=(0, 2))
    facts.add_row("queue", cell(f"{letter['queue']}  (archived from {letter['dlq']})"))
    facts.add_row("message", cell(f"{letter['type']}{version}  id {letter['message_id'] or '-'}"))
    facts.add_row("saga", cell(letter["saga_id"] or "-"))
    facts.add_row("reason", cell(f"{letter['reason_class']}: {letter['reason']}"))
    facts.add_row("attempts", cell(letter["attempts"]))
    facts.add_row("failed", f"first {when(letter['first_failure_at'])}, last {when(letter['last_failure_at'])} (UTC)")
    facts.add_row(
        "original", cell(f"exchange {letter['original_exchange'] or '(default)'}, routing key {letter['original_routing_key']}")
    )
    facts.add_row("archived", when(letter["archived_at"]))
    if letter["replay_count"]:
        patch = f", patch {json.dumps(letter['replay_patch'])}" if letter["replay_patch"] else ""
        facts.add_row("replayed", cell(f"{letter['replay_count']}×, last {when(letter['replayed_at'])}{patch}"))
    if letter["purged_at"]:
        facts.add_row("purged", when(letter["purged_at"]))
    console.print(facts, highlight=False)
    headers = detail_table("header", "value", title="headers")
    for name, value in sorted(letter["headers"].items()):
        headers.add_row(cell(name), cell(_short(json.dumps(value) if not isinstance(value, str) else value, 100)))
    console.print(headers)
    body = letter["body"]
    if letter["body_form"] == "json":
        payload = body.get("payload", body) if isinstance(body, dict) else body
        console.print("[bold]payload[/bold]" if isinstance(body, dict) and "payload" in body else "[bold]body[/bold]")
        console.print(json_view(payload))
    else:
        console.print(Text.assemble(("body", "bold"), f" ({visible(letter['body_form'])})"))
        console.print(cell(_short(body, 2000)))
    if saga is None:
        console.print("saga: none (the message names no saga)")
    elif saga["status"] is None:
        console.print(cell(f"saga {saga['saga_id']}: {saga['note']}"))
    else:
        console.print(
            Text.assemble(
                f"saga {visible(saga['saga_id'])}: ",
                (visible(saga["status"]), "bold"),
                f" (version {saga['version']}) {visible(saga['reason'] or '')}",
            )
        )
        transitions = detail_table("v", "at (UTC)", "trigger", "from → to", "note", title="last transitions")
        for e in saga["last_transitions"]:
            transitions.add_row(
                cell(e["version"]),
                when(e["at"]),
                cell(e["trigger"]),
                cell(f"{e['from_status'] or '-'} → {e['to_status']}"),
                cell(_short(e["note"], 60)),
            )
        console.print(transitions)
    if letter["status"] == "new" and letter["type"] == UNDECODABLE:
        console.print(f"this body cannot be replayed; once handled: compensa dlq purge {letter['id']}", highlight=False)
    elif letter["status"] == "new":
        console.print(
            f"replay it: compensa dlq replay {letter['id']} [--dry-run] [--edit '<JSON merge patch of the payload>']",
            highlight=False,
            markup=False,
        )


# ---------------------------------------------------------------- dlq replay / purge


#: Bounds of an --edit merge patch: a patch of one payload is small and shallow.
MAX_PATCH_BYTES = 1 << 20
MAX_PATCH_DEPTH = 32


def _strict_int(digits: str) -> int:
    # Checked before int(): Python refuses more than 4300 digits, and no payload field holds more than 64 bits.
    if len(digits.lstrip("-")) > 19 or not -(2**63) <= int(digits) < 2**63:
        raise ValueError(f"the integer {clip(digits)} does not fit in 64 bits")
    return int(digits)


def _finite_float(text: str) -> float:
    number = float(text)
    if number in (float("inf"), float("-inf")):
        raise ValueError(f"the number {clip(text)} is out of range")
    return number


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {clip(key)} appears twice in one object")
        result[key] = value
    return result


def _parse_patch(edit: str | None) -> dict[str, Any] | None:
    """The --edit merge patch (inline JSON or @file), bounded in size, depth and numbers."""
    if edit is None:
        return None
    text = edit
    if edit.startswith("@"):
        path = Path(edit[1:])
        try:
            with path.open("rb") as file:
                raw = file.read(MAX_PATCH_BYTES + 1)
        except OSError as exc:
            fail(f"--edit: cannot read {clip(str(path), 80)}: {exc.strerror or exc}")
        if len(raw) > MAX_PATCH_BYTES:
            fail(f"--edit: {clip(str(path), 80)} is larger than {MAX_PATCH_BYTES:,} bytes; a merge patch of one payload is small")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            fail(f"--edit: {clip(str(path), 80)} is not UTF-8 (byte {exc.start})")
    elif len(edit) > MAX_PATCH_BYTES:
        fail(f"--edit: longer than {MAX_PATCH_BYTES:,} characters; a merge patch of one payload is small")
    from contracts import json_depth

    depth = json_depth(text)
    if depth > MAX_PATCH_DEPTH:
        fail(f"--edit: JSON nested {depth:,} levels deep; a merge patch may nest at most {MAX_PATCH_DEPTH}")
    try:
        patch = json.loads(
            text, parse_int=_strict_int, parse_float=_finite_float, parse_constant=_no_constant, object_pairs_hook=_unique_keys
        )
    except json.JSONDecodeError as exc:
        fail(
            f"--edit: not valid JSON ({exc}); give a JSON merge patch of the payload, "
            f'e.g. \'{{"lines": [{{"sku": "A", "quantity": 1}}]}}\''
        )
    except (ValueError, RecursionError) as exc:
        fail(f"--edit: {exc}")
    if not isinstance(patch, dict):
        fail("--edit: a merge patch of the payload must be a JSON object")
    return patch


async def _saga_of(engine: Any, selected: list[int]) -> str | None:
    """The one saga the selected dead letters name, for their audit row (None for several or none)."""
    from infra.audit import only_saga
    from infra.dlq.query import saga_ids_of

    async with engine.connect() as connection:
        return only_saga((await saga_ids_of(connection, selected)).values())


async def _selection(engine: Any, ids: tuple[int, ...], where: Any) -> list[int]:
    from infra.dlq.query import matching_ids, missing_ids

    async with engine.connect() as connection:
        if ids:
            missing = await missing_ids(connection, ids)
            if missing:
                fail(
                    f"no dead letter {', '.join(map(str, missing[:10]))}{' …' if len(missing) > 10 else ''}; "
                    "`compensa dlq list` shows them"
                )
        return await matching_ids(connection, where)


def _hosted(app: str | None, as_json: bool) -> Footprint:
    """The footprint (`infra.apps.footprint`) of the app `--app` names: its queues, by name and spec."""
    from infra.apps import footprint

    return footprint(load_app_or_exit(app, as_json=as_json))


def _named(
    ids: list[str] | None, everything: bool, *, status: str | None, hosted: Footprint, **filters: Any
) -> tuple[tuple[int, ...], Any]:
    """The ids and filter an operator action names; refuse naming nothing; status new by default."""
    parsed = parse_ids(ids or [])
    where = _filter(parsed, status=status, hosted=hosted, **filters)
    if where.is_empty and not everything:
        fail(
            "name the dead letters: ids, a filter (--queue, --type, --reason-class, --saga, --since, --until, --status) or --all"
        )
    if not parsed and status is None:
        where = dataclasses.replace(where, status="new")
    return parsed, where


@app.command("replay")
@command
async def dlq_replay(
    ids: IdsArg = None,
    queue: QueueOpt = None,
    type_: TypeOpt = None,
    reason_class: ReasonOpt = None,
    saga: SagaOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    status: Annotated[str | None, typer.Option("--status", help="With a filter: which status to replay (default new).")] = None,
    everything: AllOpt = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and show what would be sent; write nothing.")] = False,
    edit: Annotated[
        str | None, typer.Option("--edit", help="JSON merge patch (RFC 7396) applied to each payload, or @file.json.")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=10_000, help="Dead letters per transaction.")] = 200,
    as_json: JsonOpt = False,
    app: AppOpt = None,
) -> None:
    """Send dead letters back to their original queue, once each, through the dlq outbox.

    Each is validated against its contract (after --edit), written to the outbox
    addressed to the queue it failed on and marked replayed, in one transaction;
    already replayed or purged ones are skipped. A relay (`compensa run` or
    `compensa relay`) delivers them. Exits 1 when any was refused. With --app, dead
    letters go back to the app's queues (and a relay hosting it delivers them).
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from infra.clock import SystemClock
    from infra.dlq.replay import replay

    hosted = _hosted(app, as_json)
    patch = _parse_patch(edit)
    parsed, where = _named(
        ids,
        everything,
        queue=queue,
        type_=type_,
        reason_class=reason_class,
        saga=saga,
        since=since,
        until=until,
        status=status,
        hosted=hosted,
    )
    async with database() as engine:
        selected = await _selection(engine, parsed, where)
        show_progress = len(selected) >= 20
        progress = Progress(
            TextColumn("dry run" if dry_run else "replaying"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=err,
            disable=not show_progress,
        )
        with progress:
            task = progress.add_task("replay", total=len(selected), rate="")

            def advance(count: int) -> None:
                progress.advance(task, count)
                elapsed = progress.tasks[task].elapsed or 0
                if elapsed:
                    progress.update(task, rate=f"{progress.tasks[task].completed / elapsed:,.0f}/s")

            summary = await replay(
                engine,
                SystemClock(),
                selected,
                patch=patch,
                dry_run=dry_run,
                batch_size=batch_size,
                queues={q.name: q for q in hosted.queues},
                on_progress=advance,
            )
        if selected and not dry_run:
            refusals = [f"{o.id}: {o.detail}" for o in summary.outcomes if o.action == "refused"][:5]
            await audited(
                engine,
                "dlq.replay",
                list(selected),
                outcome="ok" if summary.replayed else "refused",
                detail=f"replayed {summary.replayed}, skipped {summary.skipped}, refused {summary.refused}"
                + (f" ({'; '.join(refusals)})" if refusals else ""),
                parameters={"patch": patch, "filter": where.describe()} if patch is not None else {"filter": where.describe()},
                saga_id=await _saga_of(engine, selected),
            )
    if as_json:
        print_json(summary.as_dict())
    else:
        _print_replay(summary, len(selected))
    if summary.refused:
        raise typer.Exit(1)


def _print_replay(summary: Any, selected: int) -> None:
    if selected == 0:
        console.print("no dead letters match (a filter replays status new unless --status says otherwise)", highlight=False)
        return
    verb = "would replay" if summary.dry_run else "replayed"
    console.print(
        f"{verb} {summary.replayed}, skipped {summary.skipped}, refused {summary.refused}"
        + (" — dry run, nothing written" if summary.dry_run else ""),
        highlight=False,
    )
    shown = [o for o in summary.outcomes if o.action in ("skipped", "refused")] if selected > 20 else summary.outcomes
    if shown:
        table = detail_table("id", "outcome", "queue", "type", "detail")
        for o in shown[:50]:
            table.add_row(cell(o.id), cell(o.action), cell(o.queue or "-"), cell(o.type or "-"), cell(o.detail))
        console.print(table)
        if len(shown) > 50:
            console.print(f"… and {len(shown) - 50} more (use --json for all)", highlight=False)
    patched = next((o for o in summary.outcomes if o.payload is not None), None)
    if patched is not None:
        console.print(f"edited payload of dead letter {patched.id}:", highlight=False)
        console.print(json_view(patched.payload))
    if summary.replayed and not summary.dry_run:
        console.print(
            "queued in the dlq outbox; a running relay (`compensa run` or `compensa relay`) delivers them", highlight=False
        )


@app.command("purge")
@command
async def dlq_purge(
    ids: IdsArg = None,
    queue: QueueOpt = None,
    type_: TypeOpt = None,
    reason_class: ReasonOpt = None,
    saga: SagaOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    status: Annotated[str | None, typer.Option("--status", help="With a filter: which status to purge (default new).")] = None,
    everything: AllOpt = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    as_json: JsonOpt = False,
    app: AppOpt = None,
) -> None:
    """Mark dead letters purged: they stay in the archive (status purged) but leave the work list."""
    from infra.clock import SystemClock
    from infra.dlq.query import DeadLetterFilter, purge

    parsed, where = _named(
        ids,
        everything,
        queue=queue,
        type_=type_,
        reason_class=reason_class,
        saga=saga,
        since=since,
        until=until,
        status=status,
        hosted=_hosted(app, as_json),
    )
    async with database() as engine:
        selected = await _selection(engine, parsed, where)
        if selected and not yes:
            confirm(f"purge {len(selected)} dead letters ({where.describe()})", declined="nothing purged")
        purged = await purge(engine, DeadLetterFilter(ids=tuple(selected)), SystemClock().now()) if selected else 0
        if selected:
            await audited(
                engine,
                "dlq.purge",
                list(selected),
                detail=f"purged {purged} of {len(selected)}",
                parameters={"filter": where.describe()},
                saga_id=await _saga_of(engine, selected),
            )
    if as_json:
        print_json({"purged": purged, "ids": selected})
        return
    console.print(cell(f"purged {purged} dead letters ({where.describe()}); they stay in the archive with status purged"))


@app.command("prune")
@command
async def dlq_prune(
    older_than: Annotated[str, typer.Option("--older-than", help="Replayed or purged longer ago than this (30d, 12h).")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    as_json: JsonOpt = False,
    app: AppOpt = None,
) -> None:
    """Delete archived dead letters dealt with (replayed or purged) long ago; `new` ones always stay.

    The archive is one table: prune covers every app's dead letters, as `dlq list`
    shows them; `--app` is accepted like by the other dlq commands (and must load).
    """
    from infra.clock import SystemClock
    from infra.dlq.query import prune

    _hosted(app, as_json)
    cutoff = SystemClock().now() - parse_duration(older_than, "--older-than")
    if not yes:
        confirm(
            f"delete replayed and purged dead letters dealt with before {cutoff:%Y-%m-%d %H:%M} UTC", declined="nothing deleted"
        )
    async with database() as engine:
        deleted = await prune(engine, cutoff)
        await audited(
            engine,
            "dlq.prune",
            [f"replayed or purged before {cutoff.isoformat()}"],
            detail=f"deleted {deleted['replayed']} replayed and {deleted['purged']} purged dead letters",
            parameters={"older_than": older_than, "before": cutoff.isoformat(), "deleted": deleted},
        )
    if as_json:
        print_json({"deleted": deleted, "before": cutoff.isoformat()})
        return
    console.print(
        f"deleted {deleted['replayed']} replayed and {deleted['purged']} purged dead letters dealt with before "
        f"{cutoff:%Y-%m-%d %H:%M} UTC; dead letters still new are kept",
        highlight=False,
    )
