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
from rich.cells import cell_len
from rich.console import Console
from rich.highlighter import JSONHighlighter
from rich.table import Table
from rich.text import Text

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
    if not typer.confirm(f"{visible(action)}?", default=False, err=True):
        err.print(declined)
        raise typer.Exit(1)


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


# ---------------------------------------------------------------- showing stored values
#
# Whatever the database or a message holds reaches the terminal only through these:
# never as Rich markup (a stored `[/]` would crash the print, `[bold]` would restyle it)
# and never with its control characters raw (an ESC would drive the operator's terminal).


def visible(value: Any) -> str:
    """`value` as text with every control or invisible character written as its escape (`\\x1b`)."""
    text = "" if value is None else str(value)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def cell(value: Any) -> Text:
    """A stored value as a table cell or printable: visible, never parsed as markup."""
    return Text(visible(value))


def clip(text: str, width: int = 40) -> str:
    """Operator input quoted in an error message: repr-escaped, and cut to about `width`."""
    quoted = repr(text)
    return quoted if len(quoted) <= width else quoted[: width - 2] + "…" + quoted[-1]


def _json_escape(ch: str) -> str:
    code = ord(ch)
    if code > 0xFFFF:
        code -= 0x10000
        return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"
    return f"\\u{code:04x}"


def json_view(value: Any) -> Text:
    """Indented, highlighted JSON whose invisible characters are JSON escapes (still valid JSON)."""
    text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
    text = "".join(ch if ch.isprintable() or ch == "\n" else _json_escape(ch) for ch in text)
    return JSONHighlighter()(Text(text))


def _fill(wants: list[int], budget: int) -> list[int]:
    """Widths no wider than `wants` summing to at most `budget`: the widest are capped first."""
    if sum(wants) <= budget:
        return list(wants)
    low, high = 0, max(wants)
    while low < high:
        cap = (low + high + 1) // 2
        if sum(min(w, cap) for w in wants) <= budget:
            low = cap
        else:
            high = cap - 1
    widths = [min(w, low) for w in wants]
    spare = budget - sum(widths)
    for index, want in enumerate(wants):
        if spare <= 0:
            break
        if want > widths[index]:
            widths[index] += 1
            spare -= 1
    return widths


def detail_table(*headers: str, title: str | None = None) -> Table:
    """A table for a detail view: cells wrap, and a word too long for its column folds, never cut."""
    table = Table(title=title)
    for header in headers:
        table.add_column(header, overflow="fold")
    return table


#: The narrowest a shrunk column may get before an optional column is hidden to make room.
_NARROWEST = 8


def one_line_table(
    headers: list[str],
    rows: list[list[Any]],
    *,
    width: int,
    keep: tuple[str, ...] = (),
    hide: tuple[str, ...] = (),
    title: str | None = None,
) -> Table:
    """A table of stored values, one line per row, fitted to `width` terminal columns.

    The `keep` columns (ids an operator copies into the next command) are never cut:
    they get their full width and the other columns shrink, ellipsized, widest first.
    When that would leave a column narrower than 8 cells, the `hide` columns are left
    out, in that order, and the caption names them. Only when the kept columns alone
    cannot fit do they fold onto further lines (whole, never cut).
    """
    cells = [[visible(value) for value in row] for row in rows]
    natural = [max([cell_len(header), *(cell_len(row[i]) for row in cells)]) for i, header in enumerate(headers)]
    shown = list(range(len(headers)))

    def room(columns: list[int]) -> int:
        # A default table spends 3 cells per column (padding, rule) and one for the right edge.
        return max(width - 3 * len(columns) - 1, len(columns))

    hidden: list[str] = []
    for name in hide:
        need = sum(natural[i] if headers[i] in keep else min(natural[i], _NARROWEST) for i in shown)
        if need <= room(shown):
            break
        shown.remove(headers.index(name))
        hidden.append(name)
    kept = [i for i in shown if headers[i] in keep]
    others = [i for i in shown if headers[i] not in keep]
    available = room(shown)
    widths = list(natural)
    fold = sum(natural[i] for i in kept) + len(others) > available  # every other column keeps at least its "…"
    if fold:
        for i, w in zip(kept, _fill([natural[i] for i in kept], max(available - len(others), len(kept))), strict=True):
            widths[i] = max(w, 1)
        budget = len(others)
    else:
        budget = available - sum(natural[i] for i in kept)
    for i, w in zip(others, _fill([natural[i] for i in others], budget), strict=True):
        widths[i] = max(w, 1)
    caption = Text(f"not shown at {width} columns: {', '.join(hidden)} (--json shows all)", style="dim") if hidden else None
    table = Table(title=Text(visible(title)) if title is not None else None, caption=caption)
    for i in shown:
        if i in kept:
            table.add_column(headers[i], width=widths[i], no_wrap=not fold, overflow="fold")
        else:
            table.add_column(headers[i], width=widths[i], no_wrap=True, overflow="ellipsis")
    for row in cells:
        table.add_row(*(Text(row[i]) for i in shown))
    return table


# ---------------------------------------------------------------- parsing


_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d|w)")
#: What might be a duration (numbers with or without units): said to be a bad duration, not a bad time.
_DURATION_LIKE = re.compile(r"[0-9]+(?:\.[0-9]+)?(?:ms|[smhdw])?")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
#: The longest duration accepted anywhere (a filter, a retention): beyond it a time is out of range.
MAX_DURATION = timedelta(days=36525)
#: Dead letters one command may name by id (ranges included): one replay batch at most.
MAX_IDS = 10_000
#: Dead-letter ids are BIGINT on every backend.
MAX_ID = 2**63 - 1


def parse_duration(text: str, option: str = "duration") -> timedelta:
    """`90s`, `10m`, `2h`, `1d`, `1h30m` (or plain seconds) as a timedelta, at most 100 years."""
    value = text.strip().lower().replace(" ", "")
    if re.fullmatch(r"[0-9]+(?:\.[0-9]+)?", value):
        seconds = float(value)
    elif value and _DURATION.sub("", value) == "":
        seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION.findall(value))
    else:
        fail(f"{option}: bad duration {clip(text)}; use e.g. 30s, 10m, 2h, 1d or 1h30m")
        raise AssertionError("unreachable")
    # float() of 400 digits is inf, which no timedelta holds: bound before converting.
    if not seconds <= MAX_DURATION.total_seconds():
        fail(f"{option}: duration {clip(text)} is longer than 100 years; give at most 36525d")
    return timedelta(seconds=seconds)


def parse_time(text: str, option: str, now: datetime) -> datetime:
    """An ISO 8601 time, YYYY-MM-DD first (UTC when no offset is given), or a duration ago (`2h`)."""
    value = text.strip()
    expected = f"{option}: expected an ISO 8601 time (2026-01-31T10:00:00Z) or a duration ago (30m, 2h, 1d), got {clip(text)}"
    if re.match(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", value):
        try:
            moment = datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value)
        except ValueError:
            fail(expected)
            raise AssertionError("unreachable") from None
        try:
            return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
        except OverflowError:
            fail(f"{option}: {clip(text)} is out of range once converted to UTC")
            raise AssertionError("unreachable") from None
    # A linear check (no nested quantifiers: `(\d+…)+` backtracks exponentially on `1111…x`).
    if value and _DURATION_LIKE.sub("", value.lower()) == "":
        if re.fullmatch(r"[0-9.]+", value):
            # Bare digits could be seconds or a basic-format date (20260131): neither is guessed.
            fail(f"{option}: {clip(text)} has no unit; give a duration ago with one (90s, 30m, 2h) or an ISO time (2026-01-31)")
        return now - parse_duration(value, option)
    fail(expected)
    raise AssertionError("unreachable")


def _dead_letter_id(text: str) -> int | None:
    """A dead-letter id, or None when `text` is not one (ASCII digits, within BIGINT)."""
    if not re.fullmatch(r"[0-9]{1,19}", text):
        return None
    number = int(text)
    return number if number <= MAX_ID else None


def parse_ids(values: list[str]) -> tuple[int, ...]:
    """Dead-letter ids from arguments (`12`, `12,13`, `20-25`), at most MAX_IDS in all."""
    ids: list[int] = []
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            low_text, dash, high_text = part.partition("-")
            low = _dead_letter_id(low_text)
            high = _dead_letter_id(high_text) if dash else low
            if low is None or high is None:
                if re.fullmatch(r"[0-9]+(-[0-9]+)?", part):
                    fail(f"bad dead-letter id {clip(part)}: ids are numbers from 0 to {MAX_ID}")
                fail(f"bad dead-letter id {clip(part)}: ids are numbers (12, 12,13 or 20-25); `compensa dlq list` shows them")
                raise AssertionError("unreachable")
            if high < low:
                fail(f"bad id range {clip(part)}: the first id is the lower one (20-25)")
            if high - low + 1 > MAX_IDS or len(ids) + high - low + 1 > MAX_IDS:
                fail(
                    f"too many dead-letter ids ({part} makes more than {MAX_IDS:,}): replay or purge at most {MAX_IDS:,} "
                    "ids per command, in parts (1-10000, 10001-20000, …), or select them with a filter (--queue, --since, --all)"
                )
            ids.extend(range(low, high + 1))
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


#: SQLSTATEs of a failure to connect or to stay connected: connection exceptions (08),
#: authorization (28), shutdown / cannot connect now (57P), too many connections, no such database.
_CONNECTION_SQLSTATES = ("08", "28", "57P", "53300", "3D000")


def is_connection_failure(exc: BaseException) -> bool:
    """Whether the database could not be reached (as opposed to refusing one statement)."""
    from sqlalchemy.exc import DBAPIError

    if not isinstance(exc, DBAPIError):
        return isinstance(exc, OSError | TimeoutError)
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    sqlstate = str(getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None) or "")
    if sqlstate:
        return sqlstate.startswith(_CONNECTION_SQLSTATES)
    if isinstance(orig, OSError | TimeoutError) or isinstance(getattr(orig, "__cause__", None), OSError | TimeoutError):
        return True
    return "unable to open database file" in str(orig)  # SQLite: a path it cannot open or create


def database_error_text(exc: BaseException) -> str:
    """The driver's message, first line only, without asyncpg's `<class '…'>` wrapping."""
    from sqlalchemy.exc import DBAPIError

    orig = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    lines = str(orig).strip().splitlines()
    text = lines[0] if lines else type(orig).__name__
    return re.sub(r"^<class '(?:[\w.]+\.)?(\w+)'>: ", r"\1: ", text)


def explain_database_error(exc: BaseException, where: str | None = None) -> str:
    """One line for a failed database call: missing tables, unreachable, or the error itself."""
    text = database_error_text(exc)
    at = f" at {where}" if where else ""
    if "no such table" in text or ("relation" in text and "does not exist" in text):
        return f"the database{at} has no compensa tables yet ({text}); run `compensa db upgrade`"
    if is_connection_failure(exc):
        return f"cannot reach the database{at} ({text}); check COMPENSA_DATABASE_URL and that the server runs"
    return f"the database{at} refused the query: {text}"


@contextlib.asynccontextmanager
async def _database() -> AsyncIterator[Any]:
    """An engine on COMPENSA_DATABASE_URL; a failing database becomes one line that says why."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import DBAPIError

    from infra.db import create_engine
    from infra.settings import get_settings

    url = get_settings().database_url
    engine = create_engine(url)
    where = make_url(url).render_as_string(hide_password=True)
    try:
        yield engine
    except (DBAPIError, OSError, TimeoutError) as exc:
        fail(explain_database_error(exc, where))
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
        console.print(one_line_table(
            ["queue", "reason class", "count", "sagas", "first failure", "last failure", "example reason"],
            [[g["queue"], g["reason_class"], g["count"], g["sagas"], _when(g["first_failure_at"], short=True),
              _when(g["last_failure_at"], short=True), _short(g["example_reason"], 200)] for g in groups],
            width=console.width, keep=("queue", "reason class"), hide=("sagas", "first failure", "last failure"),
            title=f"failure groups ({where.describe()})",
        ))
        if not groups:
            console.print("no dead letters match", highlight=False)
        return
    if as_json:
        _print_json({"total": total, "dead_letters": rows})
        return
    console.print(one_line_table(
        ["id", "failed (UTC)", "queue", "type", "saga", "reason class", "att", "status", "reason"],
        [[r["id"], _when(r["last_failure_at"], short=True), r["queue"], r["type"], r["saga_id"] or "-", r["reason_class"],
          r["attempts"], r["status"], _short(r["reason"], 200)] for r in rows],
        width=console.width, keep=("id", "saga"), hide=("att", "status", "failed (UTC)", "queue", "type", "reason class"),
    ))
    shown = f"{len(rows)} of {total}" if total > len(rows) else str(total)
    console.print(cell(f"{shown} dead letters ({where.describe()}); `compensa dlq show ID` for one in full"))


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
    from infra.dlq.query import get_dead_letter
    from infra.dlq.tables import UNDECODABLE

    number = _dead_letter_id(dead_letter_id.strip())
    if number is None:
        fail(f"bad dead-letter id {clip(dead_letter_id)}: ids are numbers from 0 to {MAX_ID}; `compensa dlq list` shows them")
        raise AssertionError("unreachable")
    async with _database() as engine, engine.connect() as connection:
        letter = await get_dead_letter(connection, number)
        if letter is None:
            fail(f"no dead letter {number}; `compensa dlq list` shows them")
        saga = await _saga_summary(connection, letter["saga_id"])
    if as_json:
        _print_json({"dead_letter": letter, "saga": saga})
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
    facts.add_row("failed", f"first {_when(letter['first_failure_at'])}, last {_when(letter['last_failure_at'])} (UTC)")
    facts.add_row("original", cell(f"exchange {letter['original_exchange'] or '(default)'}, routing key {letter['original_routing_key']}"))
    facts.add_row("archived", _when(letter["archived_at"]))
    if letter["replay_count"]:
        patch = f", patch {json.dumps(letter['replay_patch'])}" if letter["replay_patch"] else ""
        facts.add_row("replayed", cell(f"{letter['replay_count']}×, last {_when(letter['replayed_at'])}{patch}"))
    if letter["purged_at"]:
        facts.add_row("purged", _when(letter["purged_at"]))
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
        console.print(Text.assemble(
            f"saga {visible(saga['saga_id'])}: ", (visible(saga["status"]), "bold"),
            f" (version {saga['version']}) {visible(saga['reason'] or '')}",
        ))
        transitions = detail_table("v", "at (UTC)", "trigger", "from → to", "note", title="last transitions")
        for e in saga["last_transitions"]:
            at = _when(e["at"] if e["at"].tzinfo else e["at"].replace(tzinfo=UTC))
            transitions.add_row(cell(e["version"]), at, cell(e["trigger"]), cell(f"{e['from_status'] or '-'} → {e['to_status']}"), cell(_short(e["note"], 60)))
        console.print(transitions)
    if letter["status"] == "new" and letter["type"] == UNDECODABLE:
        console.print(f"this body cannot be replayed; once handled: compensa dlq purge {letter['id']}", highlight=False)
    elif letter["status"] == "new":
        console.print(f"replay it: compensa dlq replay {letter['id']} [--dry-run] [--edit '<JSON merge patch of the payload>']", highlight=False, markup=False)


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
    from infra.dlq.query import json_depth

    depth = json_depth(text)
    if depth > MAX_PATCH_DEPTH:
        fail(f"--edit: JSON nested {depth:,} levels deep; a merge patch may nest at most {MAX_PATCH_DEPTH}")
    try:
        patch = json.loads(
            text, parse_int=_strict_int, parse_float=_finite_float, parse_constant=_no_constant, object_pairs_hook=_unique_keys
        )
    except json.JSONDecodeError as exc:
        fail(f"--edit: not valid JSON ({exc}); give a JSON merge patch of the payload, e.g. '{{\"lines\": [{{\"sku\": \"A\", \"quantity\": 1}}]}}'")
    except (ValueError, RecursionError) as exc:
        fail(f"--edit: {exc}")
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
    console.print(cell(f"purged {purged} dead letters ({where.describe()}); they stay in the archive with status purged"))


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
    console.print(cell(
        f"saga {saga_id}: {was} → {result['status']}; "
        + (f"{sent_verb} {', '.join(sent)} (a running relay delivers them)" if sent else transition.note)
    ))


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
    from rich.markup import escape

    table = Table("check", "ok", "detail")
    for name, check in report["checks"].items():
        if not check.get("ok"):
            detail = f"{check.get('error', 'failed')} — {check.get('fix', '')}".rstrip(" —")
        elif name == "database":
            detail = f"{check.get('url')} at revision {check.get('revision')} ({check.get('latency_ms')} ms)"
        elif name == "broker":
            detail = check.get("note") or f"{check.get('url')} ({check.get('latency_ms')} ms), topology declared"
        elif name == "queues":
            detail = check.get("note") or "; ".join(
                f"{q} {v['ready']} ready/{v['unacked']} unacked/{v['consumers']} consumers" for q, v in check["queues"].items()
            )
        elif name == "redis":
            detail = f"{check.get('url')} ({check.get('latency_ms')} ms)" if check.get("configured") else "not configured (COMPENSA_REDIS_URL unset)"
        elif name == "relay":
            detail = f"{check['pending']} pending, oldest {check['max_lag_seconds']:.1f}s (limit {check['limit_seconds']:.0f}s)"
        elif name == "saga_starts":
            detail = f"every order older than {check['limit_seconds']:g}s has its saga"
        elif name == "deadlines":
            detail = f"none overdue by more than {check['limit_seconds']:g}s"
        elif name == "dead_letters":
            waiting = {q: v["waiting_in_dlq"] for q, v in check["queues"].items() if v["waiting_in_dlq"]}
            archived = {q: v["archived_new"] for q, v in check["queues"].items() if v["archived_new"]}
            detail = f"in DLQs {waiting or 0}; archived, status new {archived or 0}"
        else:
            detail = ""
        if check.get("ok"):
            mark = "[green]yes[/green]"
        elif check.get("unavailable"):
            mark = "[yellow]unknown[/yellow]"
        else:
            mark = "[red]NO[/red]"
        table.add_row(name, mark, escape(str(detail)))
    console.print(table, highlight=False)
    for warning in report["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False)
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
