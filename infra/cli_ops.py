"""Operator commands: `compensa dlq …`, `saga retry`, `health`, `bench replay`.

Registered on the main app in infra/cli.py. This module does not import infra.cli
at import time (infra.cli imports it); each command body runs through infra.cli's
`command` wrapper, which prints known failures as one line instead of a traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

dlq_app = typer.Typer(
    help="Dead letters: the archive of failed messages (list, show, replay, purge).",
    no_args_is_help=True,
)


def command(fn: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Any]:
    """infra.cli's `command` wrapper, looked up when the command runs."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from infra.cli import command as run_command

        return run_command(fn)(*args, **kwargs)

    return wrapper


def fail(message: str) -> None:
    from infra.cli import CliError

    raise CliError(message)


def _confirm(action: str, *, declined: str) -> None:
    """Ask on a terminal before `action`; without one, refuse and name --yes."""
    if not sys.stdin.isatty():
        fail(f"would {action}; confirm with --yes")
    if not typer.confirm(f"{action}?", default=False, err=True):
        err.print(declined)
        raise typer.Exit(1)


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


# ---------------------------------------------------------------- parsing


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str, option: str = "duration") -> timedelta:
    """`90s`, `10m`, `2h`, `1d`, `1h30m` (or plain seconds) as a timedelta."""
    value = text.strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return timedelta(seconds=float(value))
    if value and _DURATION.sub("", value) == "":
        return timedelta(seconds=sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION.findall(value)))
    fail(f"{option}: bad duration {text!r}; use e.g. 30s, 10m, 2h, 1d or 1h30m")
    raise AssertionError("unreachable")


def parse_time(text: str, option: str, now: datetime) -> datetime:
    """An ISO 8601 time (UTC when no offset is given) or a duration ago (`2h` = two hours ago)."""
    value = text.strip()
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
    except ValueError:
        if value and re.fullmatch(r"(\d+(\.\d+)?(ms|s|m|h|d|w)?)+", value.lower()):
            return now - parse_duration(value, option)
        fail(f"{option}: expected an ISO 8601 time (2026-01-31T10:00:00Z) or a duration ago (30m, 2h, 1d), got {text!r}")
        raise AssertionError("unreachable") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def parse_ids(values: list[str]) -> tuple[int, ...]:
    """Dead-letter ids from arguments (`12`, `12,13`, `20-25`)."""
    ids: list[int] = []
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            if re.fullmatch(r"\d+", part):
                ids.append(int(part))
            elif re.fullmatch(r"\d+-\d+", part):
                low, high = (int(x) for x in part.split("-"))
                if high < low or high - low > 1_000_000:
                    fail(f"bad id range {part!r}")
                ids.extend(range(low, high + 1))
            else:
                fail(f"bad dead-letter id {part!r}: ids are numbers (12, 12,13 or 20-25); `compensa dlq list` shows them")
    return tuple(dict.fromkeys(ids))


def saga_age_filters(query: Any, *, older_than: str | None, stuck_for: str | None, now: datetime | None = None) -> Any:
    """Add `saga list --older-than / --stuck-for` conditions to a saga_instances query."""
    from sagas.state import TERMINAL
    from sagas.tables import saga_instances as s

    now = now or datetime.now(UTC)
    if older_than:
        query = query.where(s.c.started_at < now - parse_duration(older_than, "--older-than"))
    if stuck_for:
        query = query.where(
            s.c.status.not_in([status.value for status in TERMINAL]),
            s.c.updated_at < now - parse_duration(stuck_for, "--stuck-for"),
        )
    return query


# ---------------------------------------------------------------- database access


@contextlib.asynccontextmanager
async def _database() -> AsyncIterator[Any]:
    """An engine on COMPENSA_DATABASE_URL; a missing table becomes an `upgrade` hint."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import DBAPIError, OperationalError

    from infra.db import create_engine
    from infra.settings import get_settings

    url = get_settings().database_url
    engine = create_engine(url)
    where = make_url(url).render_as_string(hide_password=True)
    try:
        yield engine
    except DBAPIError as exc:
        text = str(exc.orig if exc.orig is not None else exc).strip().splitlines()[0]
        if "no such table" in text or ("relation" in text and "does not exist" in text):
            fail(f"the database at {where} has no compensa tables yet ({text}); run `compensa db upgrade`")
        if exc.connection_invalidated or isinstance(exc, OperationalError):
            fail(f"database at {where} unreachable or failing ({text}); check COMPENSA_DATABASE_URL and that the server runs")
        raise
    except (OSError, TimeoutError) as exc:
        fail(f"cannot reach the database at {where} ({exc or type(exc).__name__}); check COMPENSA_DATABASE_URL and that the server runs")
    finally:
        await engine.dispose()


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
) -> Any:
    from contracts import REGISTRY
    from infra import topology as t
    from infra.dlq.query import DeadLetterFilter
    from infra.dlq.tables import STATUSES, UNDECODABLE

    now = datetime.now(UTC)
    known_queues = [q.name for q in t.WORK_QUEUES]
    if queue is not None and queue not in known_queues:
        fail(f"--queue: unknown queue {queue!r}; choose from {', '.join(known_queues)}")
    known_types = [*REGISTRY.types(), UNDECODABLE]
    if type_ is not None and type_ not in known_types:
        fail(f"--type: unknown message type {type_!r}; choose from {', '.join(known_types)}")
    if status is not None and status not in STATUSES:
        fail(f"--status: unknown status {status!r}; choose from {', '.join(STATUSES)}")
    if reason_class is not None and not reason_class.strip():
        fail("--reason-class: empty; `compensa dlq list --group` shows the reason classes")
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
ReasonOpt = Annotated[str | None, typer.Option("--reason-class", "-r", help="Reason class (contract, handler_error, transient_exhausted, …).")]
SagaOpt = Annotated[str | None, typer.Option("--saga", help="Saga (order) id.")]
SinceOpt = Annotated[str | None, typer.Option("--since", help="Failed at or after: ISO time, or a duration ago (2h).")]
UntilOpt = Annotated[str | None, typer.Option("--until", help="Failed before: ISO time, or a duration ago.")]
StatusOpt = Annotated[str | None, typer.Option("--status", help="new, replayed or purged.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]


def _short(value: Any, width: int) -> str:
    text = "" if value is None else str(value)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _one_line_rows(table: Table) -> Table:
    """One line per row: every column keeps its width, the last (a reason) is cut to fit."""
    table.expand = True
    for column in table.columns:
        column.no_wrap = True
        column.overflow = "ellipsis"
    table.columns[-1].ratio = 1
    table.columns[-1].min_width = 24
    return table


def _when(moment: datetime | None, *, short: bool = False) -> str:
    return moment.astimezone(UTC).strftime("%m-%d %H:%M:%S" if short else "%Y-%m-%d %H:%M:%S") if moment else "-"


# ---------------------------------------------------------------- dlq list / show


@dlq_app.command("list")
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
) -> None:
    """List archived dead letters (most recent failure first), or failure groups with --group."""
    from infra.dlq.query import count_dead_letters, failure_groups, list_dead_letters

    where = _filter(queue=queue, type_=type_, reason_class=reason_class, saga=saga, since=since, until=until, status=status)
    async with _database() as engine, engine.connect() as connection:
        if group:
            groups = await failure_groups(connection, where)
        else:
            rows = await list_dead_letters(connection, where, limit=limit)
            total = await count_dead_letters(connection, where)
    if group:
        if as_json:
            _print_json(groups)
            return
        table = _one_line_rows(Table("queue", "reason class", "count", "sagas", "first failure", "last failure", "example reason", title=f"failure groups ({where.describe()})"))
        for g in groups:
            table.add_row(g["queue"], g["reason_class"], str(g["count"]), str(g["sagas"]), _when(g["first_failure_at"], short=True), _when(g["last_failure_at"], short=True), _short(g["example_reason"], 200))
        console.print(table)
        if not groups:
            console.print("no dead letters match", highlight=False)
        return
    if as_json:
        _print_json({"total": total, "dead_letters": rows})
        return
    table = _one_line_rows(Table("id", "failed (UTC)", "queue", "type", "saga", "reason class", "att", "status", "reason"))
    for r in rows:
        table.add_row(str(r["id"]), _when(r["last_failure_at"], short=True), r["queue"], r["type"], r["saga_id"] or "-", r["reason_class"], str(r["attempts"]), r["status"], _short(r["reason"], 200))
    console.print(table)
    shown = f"{len(rows)} of {total}" if total > len(rows) else str(total)
    console.print(f"{shown} dead letters ({where.describe()}); `compensa dlq show ID` for one in full", highlight=False)


async def _saga_summary(connection: Any, saga_id: str | None, transitions: int = 5) -> dict[str, Any] | None:
    if not saga_id:
        return None
    from sqlalchemy import select

    from sagas.tables import saga_history as h
    from sagas.tables import saga_instances as s

    saga = (await connection.execute(select(s.c.saga_id, s.c.status, s.c.step, s.c.reason, s.c.version, s.c.updated_at).where(s.c.saga_id == saga_id))).one_or_none()
    if saga is None:
        return {"saga_id": saga_id, "status": None, "note": "no saga with this id (never started, or not a saga message)"}
    history = (
        await connection.execute(
            select(h.c.version, h.c.at, h.c.trigger, h.c.from_status, h.c.to_status, h.c.note)
            .where(h.c.saga_id == saga_id).order_by(h.c.version.desc()).limit(transitions)
        )
    ).all()
    return {**dict(saga._mapping), "last_transitions": [dict(r._mapping) for r in reversed(history)]}


@dlq_app.command("show")
@command
async def dlq_show(
    dead_letter_id: Annotated[str, typer.Argument(metavar="ID", help="Dead-letter id (from `dlq list`).")],
    as_json: JsonOpt = False,
) -> None:
    """Show one dead letter: reason, headers, payload, and where its saga stands."""
    from rich.json import JSON

    from infra.dlq.query import get_dead_letter
    from infra.dlq.tables import UNDECODABLE

    if not re.fullmatch(r"\s*\d+\s*", dead_letter_id):
        fail(f"bad dead-letter id {dead_letter_id!r}: ids are numbers; `compensa dlq list` shows them")
    number = int(dead_letter_id)
    async with _database() as engine, engine.connect() as connection:
        letter = await get_dead_letter(connection, number)
        if letter is None:
            fail(f"no dead letter {number}; `compensa dlq list` shows them")
        saga = await _saga_summary(connection, letter["saga_id"])
    if as_json:
        _print_json({"dead_letter": letter, "saga": saga})
        return
    version = f" v{letter['version']}" if letter["version"] else ""
    console.print(f"[bold]dead letter {letter['id']}[/bold]  status {letter['status']}", highlight=False)
    facts = Table.grid(padding=(0, 2))
    facts.add_row("queue", f"{letter['queue']}  (archived from {letter['dlq']})")
    facts.add_row("message", f"{letter['type']}{version}  id {letter['message_id'] or '-'}")
    facts.add_row("saga", letter["saga_id"] or "-")
    facts.add_row("reason", f"{letter['reason_class']}: {letter['reason']}")
    facts.add_row("attempts", str(letter["attempts"]))
    facts.add_row("failed", f"first {_when(letter['first_failure_at'])}, last {_when(letter['last_failure_at'])} (UTC)")
    facts.add_row("original", f"exchange {letter['original_exchange'] or '(default)'}, routing key {letter['original_routing_key']}")
    facts.add_row("archived", _when(letter["archived_at"]))
    if letter["replay_count"]:
        facts.add_row("replayed", f"{letter['replay_count']}×, last {_when(letter['replayed_at'])}" + (f", patch {json.dumps(letter['replay_patch'])}" if letter["replay_patch"] else ""))
    if letter["purged_at"]:
        facts.add_row("purged", _when(letter["purged_at"]))
    console.print(facts, highlight=False)
    headers = Table("header", "value", title="headers")
    for name, value in sorted(letter["headers"].items()):
        headers.add_row(name, _short(json.dumps(value) if not isinstance(value, str) else value, 100))
    console.print(headers)
    body = letter["body"]
    if letter["body_form"] == "json":
        payload = body.get("payload", body) if isinstance(body, dict) else body
        console.print("[bold]payload[/bold]" if isinstance(body, dict) and "payload" in body else "[bold]body[/bold]")
        console.print(JSON(json.dumps(payload, default=str)))
    else:
        console.print(f"[bold]body[/bold] ({letter['body_form']})")
        console.print(_short(body, 2000), markup=False, highlight=False)
    if saga is None:
        console.print("saga: none (the message names no saga)")
    elif saga["status"] is None:
        console.print(f"saga {saga['saga_id']}: {saga['note']}", highlight=False)
    else:
        console.print(f"saga {saga['saga_id']}: [bold]{saga['status']}[/bold] (version {saga['version']}) {saga['reason'] or ''}", highlight=False)
        transitions = Table("v", "at (UTC)", "trigger", "from → to", "note", title="last transitions")
        for e in saga["last_transitions"]:
            transitions.add_row(str(e["version"]), _when(e["at"] if e["at"].tzinfo else e["at"].replace(tzinfo=UTC)), e["trigger"], f"{e['from_status'] or '-'} → {e['to_status']}", _short(e["note"], 60))
        console.print(transitions)
    if letter["status"] == "new" and letter["type"] == UNDECODABLE:
        console.print(f"this body cannot be replayed; once handled: compensa dlq purge {letter['id']}", highlight=False)
    elif letter["status"] == "new":
        console.print(f"replay it: compensa dlq replay {letter['id']} [--dry-run] [--edit '<JSON merge patch of the payload>']", highlight=False, markup=False)


# ---------------------------------------------------------------- dlq replay / purge


def _parse_patch(edit: str | None) -> dict[str, Any] | None:
    if edit is None:
        return None
    text = edit
    if edit.startswith("@"):
        try:
            text = Path(edit[1:]).read_text()
        except OSError as exc:
            fail(f"--edit: cannot read {edit[1:]}: {exc.strerror}")
    try:
        patch = json.loads(text)
    except json.JSONDecodeError as exc:
        fail(f"--edit: not valid JSON ({exc}); give a JSON merge patch of the payload, e.g. '{{\"lines\": [{{\"sku\": \"A\", \"quantity\": 1}}]}}'")
    if not isinstance(patch, dict):
        fail("--edit: a merge patch of the payload must be a JSON object")
    return patch


async def _selection(engine: Any, ids: tuple[int, ...], where: Any) -> list[int]:
    from infra.dlq.query import matching_ids, missing_ids

    async with engine.connect() as connection:
        if ids:
            missing = await missing_ids(connection, ids)
            if missing:
                fail(f"no dead letter {', '.join(map(str, missing[:10]))}{' …' if len(missing) > 10 else ''}; `compensa dlq list` shows them")
        return await matching_ids(connection, where)


@dlq_app.command("replay")
@command
async def dlq_replay(
    ids: Annotated[list[str] | None, typer.Argument(metavar="[ID]...", help="Dead-letter ids (12, 12,13 or 20-25).")] = None,
    queue: QueueOpt = None,
    type_: TypeOpt = None,
    reason_class: ReasonOpt = None,
    saga: SagaOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    status: Annotated[str | None, typer.Option("--status", help="With a filter: which status to replay (default new).")] = None,
    everything: Annotated[bool, typer.Option("--all", help="Every dead letter with status new.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and show what would be sent; write nothing.")] = False,
    edit: Annotated[str | None, typer.Option("--edit", help="JSON merge patch (RFC 7396) applied to each payload, or @file.json.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=10_000, help="Dead letters per transaction.")] = 200,
    as_json: JsonOpt = False,
) -> None:
    """Send dead letters back to their original queue, once each, through the dlq outbox.

    Each is validated against its contract (after --edit), written to the outbox
    addressed to the queue it failed on and marked replayed, in one transaction;
    already replayed or purged ones are skipped. A relay (`compensa run` or
    `compensa relay`) delivers them. Exits 1 when any was refused.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from infra.clock import SystemClock
    from infra.dlq.replay import replay

    patch = _parse_patch(edit)
    parsed = parse_ids(ids or [])
    where = _filter(parsed, queue=queue, type_=type_, reason_class=reason_class, saga=saga, since=since, until=until, status=status)
    if where.is_empty and not everything:
        fail("name the dead letters: ids, a filter (--queue, --type, --reason-class, --saga, --since, --until, --status) or --all")
    if not parsed and status is None:
        where = dataclasses.replace(where, status="new")
    async with _database() as engine:
        selected = await _selection(engine, parsed, where)
        show_progress = len(selected) >= 20
        progress = Progress(
            TextColumn("dry run" if dry_run else "replaying"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(), console=err, disable=not show_progress,
        )
        with progress:
            task = progress.add_task("replay", total=len(selected), rate="")

            def advance(count: int) -> None:
                progress.advance(task, count)
                elapsed = progress.tasks[task].elapsed or 0
                if elapsed:
                    progress.update(task, rate=f"{progress.tasks[task].completed / elapsed:,.0f}/s")

            summary = await replay(engine, SystemClock(), selected, patch=patch, dry_run=dry_run, batch_size=batch_size, on_progress=advance)
    if as_json:
        _print_json(summary.as_dict())
    else:
        _print_replay(summary, len(selected))
    if summary.refused:
        raise typer.Exit(1)


def _print_replay(summary: Any, selected: int) -> None:
    if selected == 0:
        console.print("no dead letters match (a filter replays status new unless --status says otherwise)", highlight=False)
        return
    verb = "would replay" if summary.dry_run else "replayed"
    console.print(f"{verb} {summary.replayed}, skipped {summary.skipped}, refused {summary.refused}" + (" — dry run, nothing written" if summary.dry_run else ""), highlight=False)
    shown = [o for o in summary.outcomes if o.action in ("skipped", "refused")] if selected > 20 else summary.outcomes
    if shown:
        table = Table("id", "outcome", "queue", "type", "detail")
        for o in shown[:50]:
            table.add_row(str(o.id), o.action, o.queue or "-", o.type or "-", o.detail)
        console.print(table)
        if len(shown) > 50:
            console.print(f"… and {len(shown) - 50} more (use --json for all)", highlight=False)
    patched = next((o for o in summary.outcomes if o.payload is not None), None)
    if patched is not None:
        console.print(f"edited payload of dead letter {patched.id}:", highlight=False)
        console.print_json(json.dumps(patched.payload, default=str))
    if summary.replayed and not summary.dry_run:
        console.print("queued in the dlq outbox; a running relay (`compensa run` or `compensa relay`) delivers them", highlight=False)


@dlq_app.command("purge")
@command
async def dlq_purge(
    ids: Annotated[list[str] | None, typer.Argument(metavar="[ID]...", help="Dead-letter ids (12, 12,13 or 20-25).")] = None,
    queue: QueueOpt = None,
    type_: TypeOpt = None,
    reason_class: ReasonOpt = None,
    saga: SagaOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    status: Annotated[str | None, typer.Option("--status", help="With a filter: which status to purge (default new).")] = None,
    everything: Annotated[bool, typer.Option("--all", help="Every dead letter with status new.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Mark dead letters purged: they stay in the archive (status purged) but leave the work list."""
    from infra.clock import SystemClock
    from infra.dlq.query import DeadLetterFilter, purge

    parsed = parse_ids(ids or [])
    where = _filter(parsed, queue=queue, type_=type_, reason_class=reason_class, saga=saga, since=since, until=until, status=status)
    if where.is_empty and not everything:
        fail("name the dead letters: ids, a filter (--queue, --type, --reason-class, --saga, --since, --until, --status) or --all")
    if not parsed and status is None:
        where = dataclasses.replace(where, status="new")
    async with _database() as engine:
        selected = await _selection(engine, parsed, where)
        if selected and not yes:
            _confirm(f"purge {len(selected)} dead letters ({where.describe()})", declined="nothing purged")
        purged = await purge(engine, DeadLetterFilter(ids=tuple(selected)), SystemClock().now()) if selected else 0
    if as_json:
        _print_json({"purged": purged, "ids": selected})
        return
    console.print(f"purged {purged} dead letters ({where.describe()}); they stay in the archive with status purged", highlight=False)


@dlq_app.command("prune")
@command
async def dlq_prune(
    older_than: Annotated[str, typer.Option("--older-than", help="Replayed or purged longer ago than this (30d, 12h).")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Delete archived dead letters dealt with (replayed or purged) long ago; `new` ones always stay."""
    from infra.clock import SystemClock
    from infra.dlq.query import prune

    cutoff = SystemClock().now() - parse_duration(older_than, "--older-than")
    if not yes:
        _confirm(f"delete replayed and purged dead letters dealt with before {cutoff:%Y-%m-%d %H:%M} UTC", declined="nothing deleted")
    async with _database() as engine:
        deleted = await prune(engine, cutoff)
    if as_json:
        _print_json({"deleted": deleted, "before": cutoff.isoformat()})
        return
    console.print(
        f"deleted {deleted['replayed']} replayed and {deleted['purged']} purged dead letters dealt with before "
        f"{cutoff:%Y-%m-%d %H:%M} UTC; dead letters still new are kept",
        highlight=False,
    )


# ---------------------------------------------------------------- saga retry


@command
async def saga_retry(
    saga_id: Annotated[str, typer.Argument(metavar="ID", help="Saga (order) id.")],
    as_json: JsonOpt = False,
) -> None:
    """Resend the pending compensations of a compensation_failed saga, with a fresh budget."""
    await _saga_action(
        saga_id,
        lambda orchestrator, uow: orchestrator.retry_compensation(uow, saga_id),
        hint="`compensa saga list --status compensation_failed` shows the sagas to retry",
        was="compensation_failed",
        sent_verb="resent",
        as_json=as_json,
    )


@command
async def saga_cancel(
    saga_id: Annotated[str, typer.Argument(metavar="ID", help="Saga (order) id.")],
    reason: Annotated[str, typer.Option(help="Why (required): recorded in the saga's history and on the order.")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Cancel a running saga: compensate what it did (release stock, refund), then cancel the order."""
    if not reason.strip():
        raise typer.BadParameter("give a reason; it is recorded in the history", param_hint="--reason")
    if not yes:
        _confirm(f"cancel saga {saga_id} and compensate what it did", declined="nothing cancelled")
    await _saga_action(
        saga_id,
        lambda orchestrator, uow: orchestrator.cancel(uow, saga_id, reason.strip()),
        hint=f"`compensa saga show {saga_id}` shows where it is",
        was="running",
        sent_verb="sent",
        as_json=as_json,
    )


async def _saga_action(
    saga_id: str,
    action: Callable[[Any, Any], Awaitable[Any]],
    *,
    hint: str,
    was: str,
    sent_verb: str,
    as_json: bool,
) -> None:
    """Apply an operator action through the orchestrator in one unit of work, and report it."""
    from contracts import BusinessRuleError
    from infra.clock import SystemClock
    from infra.services import orchestrator_for
    from infra.settings import get_settings
    from outbox.uow import UnitOfWork

    orchestrator = orchestrator_for(get_settings())
    async with _database() as engine:
        async with UnitOfWork(engine, "saga", SystemClock()) as uow:
            try:
                transition = await action(orchestrator, uow)
            except BusinessRuleError as exc:
                fail(f"{exc}; {hint}")
            await uow.commit()
    sent = [payload.message_type for payload in transition.outgoing]
    result = {"saga_id": saga_id, "status": transition.state.status.value, "trigger": transition.trigger, "note": transition.note, "sent": sent}
    if as_json:
        _print_json(result)
        return
    console.print(
        f"saga {saga_id}: {was} → {result['status']}; "
        + (f"{sent_verb} {', '.join(sent)} (a running relay delivers them)" if sent else transition.note),
        highlight=False,
    )


# ---------------------------------------------------------------- health


@command
async def health(
    as_json: JsonOpt = False,
    serve: Annotated[bool, typer.Option("--serve", help="Serve GET /health over HTTP instead (container checks).")] = False,
    host: Annotated[str, typer.Option(help="With --serve: address to bind.")] = "0.0.0.0",  # noqa: S104 - a container check listens on all interfaces
    port: Annotated[int, typer.Option(min=1, max=65535, help="With --serve: port.")] = 8081,
    max_relay_lag: Annotated[float, typer.Option(min=0.1, help="Seconds a pending outbox row may wait before the relay counts as lagging.")] = 60.0,
) -> None:
    """Check database, broker, redis (when configured), relay lag and dead letters; exit 1 when unhealthy."""
    from infra.health import check_health, health_app
    from infra.settings import get_settings

    settings = get_settings()
    if serve:
        import uvicorn

        app = health_app(settings, max_relay_lag_seconds=max_relay_lag)
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
        err.print(f"serving GET http://{host}:{port}/health (200 healthy, 503 unhealthy); Ctrl-C stops", highlight=False)
        await server.serve()
        return
    report = await check_health(settings, max_relay_lag_seconds=max_relay_lag)
    if as_json:
        _print_json(report)
    else:
        _print_health(report)
    if not report["ok"]:
        raise typer.Exit(1)


def _print_health(report: dict[str, Any]) -> None:
    table = Table("check", "ok", "detail")
    for name, check in report["checks"].items():
        if not check.get("ok"):
            detail = f"{check.get('error', 'failed')} — {check.get('fix', '')}".rstrip(" —")
        elif name == "database":
            detail = f"{check.get('url')} at revision {check.get('revision')} ({check.get('latency_ms')} ms)"
        elif name == "broker":
            detail = check.get("note") or f"{check.get('url')} ({check.get('latency_ms')} ms), topology declared"
        elif name == "redis":
            detail = f"{check.get('url')} ({check.get('latency_ms')} ms)" if check.get("configured") else "not configured (COMPENSA_REDIS_URL unset)"
        elif name == "relay":
            detail = f"{check['pending']} pending, oldest {check['max_lag_seconds']:.1f}s (limit {check['limit_seconds']:.0f}s)"
        elif name == "dead_letters":
            waiting = {q: v["waiting_in_dlq"] for q, v in check["queues"].items() if v["waiting_in_dlq"]}
            archived = {q: v["archived_new"] for q, v in check["queues"].items() if v["archived_new"]}
            detail = f"in DLQs {waiting or 0}; archived, status new {archived or 0}"
        else:
            detail = ""
        table.add_row(name, "[green]yes[/green]" if check.get("ok") else "[red]NO[/red]", detail)
    console.print(table, highlight=False)
    for warning in report["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
    console.print(f"[bold]{report['status']}[/bold]")


# ---------------------------------------------------------------- bench replay


@command
async def bench_replay(
    messages: Annotated[int, typer.Option(min=100, help="Dead letters to archive and replay.")] = 10_000,
    batch_size: Annotated[int, typer.Option(min=1, max=10_000, help="Dead letters per replay transaction.")] = 200,
) -> None:
    """Replay N archived dead letters (with the progress bar), then relay them: replayed/s vs relay msgs/s."""
    from infra import bench
    from infra.dlq.bench import replay_rate

    database_url, amqp_url = bench.environment_urls()
    console.print(f"replay benchmark: {messages:,} dead letters, same PostgreSQL and RabbitMQ", highlight=False)
    result = await replay_rate(database_url, amqp_url, messages, batch_size=batch_size, console=err)
    for label, key, unit in (
        ("archive (DLQ → dead_letters, acked after commit)", "archive_per_s", "msgs/s"),
        ("replay (validate → dlq outbox + mark replayed)", "replay_per_s", "msgs/s"),
        ("relay of the replayed rows (publish with confirms)", "relay_per_s", "msgs/s"),
    ):
        console.print(f"  {label:<52} {result[key]:>12,.1f} {unit}", highlight=False)
    console.print(f"  ratio replay / relay: {result['replay_per_s'] / result['relay_per_s']:.2f}  (target ≥ 0.5)", highlight=False)
    console.print(f"  delivered to the bench queue: {result['delivered']:,.0f} of {messages:,}", highlight=False)
