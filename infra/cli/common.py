"""What every command group shares; the leaf of the CLI tree (it imports no other CLI module).

- consoles and errors: `console`, `unwrapped`, `err`, `CliError`/`fail`, `print_error`;
- `command`, the wrapper that runs a command body and prints known failures as one line
  (with `--json`, as one error object) instead of a traceback; `require_schema` for the
  long-running ones;
- openers: `open_engine`, `open_transport`, `database` (an engine whose failures say why);
- output: `print_json`, and the safe rendering of stored values (`visible`, `cell`,
  `clip`, `json_view`, `detail_table`, `one_line_table`, `when`);
- the audit trail: `audited` records a CLI action (who: COMPENSA_OPERATOR or the OS user);
- input: `confirm`, and the parsers of durations, times and dead-letter ids;
- shared options (`JsonOpt`, `AppOpt` with `load_app_or_exit`, and `ServeJsonOpt` of the long-running commands).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import re
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.cells import cell_len
from rich.console import Console
from rich.highlighter import JSONHighlighter
from rich.table import Table
from rich.text import Text

from contracts import CompensaError

F = TypeVar("F", bound=Callable[..., Any])

#: Output of the core commands (schema, stock, orders, sagas, producers, benchmarks).
console = Console()
#: Output of the operator commands (dlq, saga retry/cancel, health, bench replay): a line
#: that quotes stored values is never broken by Rich (the terminal may still wrap it).
unwrapped = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)  # an error stays one line, whatever the width

#: `--metrics-port` of the long-running commands.
MetricsPortOpt = Annotated[
    int | None,
    typer.Option(
        "--metrics-port", min=1, max=65535, help="Serve Prometheus /metrics on this port (default COMPENSA_METRICS_PORT)."
    ),
]
JsonOpt = Annotated[
    bool,
    typer.Option(
        "--json", help='Print one JSON document on stdout (on a failure {"ok": false, "error": "…"}, still a non-zero exit).'
    ),
]
#: `--json` of the long-running commands (`run`, `relay`, `api`, `console`, `health --serve`).
AppOpt = Annotated[
    str | None,
    typer.Option(
        "--app",
        envvar="COMPENSA_APP",
        help="module:attribute of a saga application (sagas.app.SagaApp; docs/tutorial.md). Default: the order saga.",
    ),
]
ServeJsonOpt = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Log as JSON lines on stderr (the start-up line too, whatever COMPENSA_LOG_FORMAT says); a failure to start "
        'is {"ok": false, "error": "…"} on stdout.',
    ),
]
#: The exit code of a command refused before it ran: a bad option or a bad COMPENSA_* value (as click's usage errors).
USAGE_EXIT = 2


# ---------------------------------------------------------------- errors


class CliError(Exception):
    """A failure the user can fix; printed as one line, exit code 1 (or `code`)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = 1) -> NoReturn:
    raise CliError(message, code)


def exit_code(exc: BaseException) -> int:
    """The exit code of an explained failure: 2 when the command was refused before it ran."""
    from infra.settings import SettingsError

    if isinstance(exc, CliError):
        return exc.code
    return USAGE_EXIT if isinstance(exc, SettingsError) else 1


def explain(exc: BaseException) -> str | None:
    """Turn infrastructure failures into a sentence that says what failed and how to fix it."""
    from sqlalchemy.exc import DBAPIError

    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, CliError | CompensaError | ValueError):
        return text
    if isinstance(exc, DBAPIError):
        # Only a failure to connect is "unreachable"; a refused statement says what was refused.
        return explain_database_error(exc)
    if isinstance(exc, ConnectionError | OSError | TimeoutError):
        return f"cannot reach a server ({text}); check COMPENSA_AMQP_URL / COMPENSA_DATABASE_URL / COMPENSA_REDIS_URL"
    return None


def print_error(explained: str, *, as_json: bool = False) -> None:
    """One `error:` line on stderr, or with --json the error object on stdout; never markup, secrets redacted."""
    from infra.logging import redact

    if as_json:
        print_json({"ok": False, "error": redact(explained)})
        return
    err.print(Text.assemble(("error:", "red"), " ", visible(redact(explained))), highlight=False)


def event_loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop factory of `COMPENSA_EVENT_LOOP`: uvloop's, or None for asyncio's own.

    uvloop (libuv) cuts the event loop's and the sockets' share of each message's CPU;
    `auto` takes it where it is installed (not on Windows), `asyncio` never.
    """
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            from infra.settings import SettingsError

            raise SettingsError("COMPENSA_EVENT_LOOP='uvloop': uvloop is not installed (pip install uvloop)") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


LONG_RUNNING = "compensa_long_running"


def long_running(fn: F) -> F:
    """Mark a command that runs until stopped: it starts telemetry itself (`start_telemetry`)."""
    setattr(fn, LONG_RUNNING, True)
    return fn


def server_log_config(level: str, as_json: bool) -> dict[str, Any]:
    """uvicorn's logging config; with --json its lines (the start-up line too) are structlog JSON on stderr."""
    import structlog
    from uvicorn.config import LOGGING_CONFIG

    if not as_json:
        return LOGGING_CONFIG
    formatter = {
        "()": structlog.stdlib.ProcessorFormatter,
        "processor": structlog.processors.JSONRenderer(),
        "foreign_pre_chain": [structlog.stdlib.add_log_level, structlog.processors.TimeStamper(fmt="iso", utc=True)],
    }
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": formatter},
        "handlers": {"default": handler},
        "loggers": {
            name: {"handlers": ["default"], "level": level.upper(), "propagate": False}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
        },
    }


def announce(as_json: bool, event: str, line: str, *, level: str = "info", **fields: Any) -> None:
    """A long-running command's start-up line: plain on stderr, or with --json a structlog JSON line there."""
    if as_json:
        import structlog

        getattr(structlog.get_logger("compensa.cli"), level)(event, message=line, **fields)
        return
    err.print(line, highlight=False, markup=False)


def start_telemetry(service_name: str, metrics_port: int | None = None) -> Any:
    """Traces and metrics for this process from OTEL_* and COMPENSA_METRICS_* (`infra.telemetry.setup`)."""
    from infra.settings import get_settings
    from infra.telemetry.setup import configure_telemetry

    settings = get_settings()
    port = metrics_port if metrics_port is not None else settings.metrics_port
    return configure_telemetry(service_name, metrics_port=port, metrics_host=settings.metrics_host)


def command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command body (async, or plain for one that runs its own loop); print known failures as one line.

    Settings are read first (a bad COMPENSA_* value is one line, exit 2), then logging is
    configured, then telemetry as the process ``compensa-cli`` (what a command publishes
    carries a trace from it), except for a `long_running` command, which starts its own
    under its name and with its metrics port (`start_telemetry`). With `as_json` (the
    `--json` option), a failure is the error object on stdout instead of a line on stderr,
    and logs are JSON lines whatever COMPENSA_LOG_FORMAT says.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from infra.logging import configure_logging
        from infra.settings import get_settings

        as_json = bool(kwargs.get("as_json"))
        try:
            settings = get_settings()
            configure_logging(settings.log_level, "json" if as_json else settings.log_format)
            if not getattr(fn, LONG_RUNNING, False):
                start_telemetry("compensa-cli")
            if inspect.iscoroutinefunction(fn):
                with asyncio.Runner(loop_factory=event_loop_factory(settings.event_loop)) as runner:
                    return runner.run(fn(*args, **kwargs))
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
        except SystemExit as exc:
            # uvicorn logs why it could not start (a port in use), then exits: a script still gets its object.
            if not as_json or exc.code in (0, None):
                raise
            print_error(f"the server stopped at start-up (exit {exc.code}); its log line on stderr says why", as_json=True)
            raise typer.Exit(exc.code if isinstance(exc.code, int) else 1) from None
        except typer.TyperException as exc:  # typer.BadParameter and the other usage errors
            if not as_json:
                raise  # typer prints it with the usage line
            print_error(exc.format_message(), as_json=True)
            raise typer.Exit(exc.exit_code) from None
        except Exception as exc:  # the CLI's last line of defence
            explained = explain(exc)
            if explained is None:
                raise
            print_error(explained, as_json=as_json)
            raise typer.Exit(exit_code(exc)) from None

    return wrapper


# ---------------------------------------------------------------- database and broker


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
    from infra.db import sqlstate

    orig = exc.orig
    code = sqlstate(exc)
    if code:
        return code.startswith(_CONNECTION_SQLSTATES)
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


def explain_database_error(exc: BaseException, where: str | None = None, *, named_by: str = "COMPENSA_DATABASE_URL") -> str:
    """One line for a failed database call: missing tables, unreachable, or the error itself."""
    text = database_error_text(exc)
    at = f" at {where}" if where else ""
    if "no such table" in text or ("relation" in text and "does not exist" in text):
        return f"the database{at} has no compensa tables yet ({text}); run `compensa db upgrade`"
    if is_connection_failure(exc):
        return f"cannot reach the database{at} ({text}); check {named_by} and that the server runs"
    return f"the database{at} refused the query: {text}"


NO_SCHEMA = "the database{at} has no compensa tables yet; run `compensa db upgrade`"


async def require_schema() -> None:
    """Refuse to start on a database that was never upgraded (a server would log failures forever)."""
    from infra.schema import current_revision

    async with database() as engine:
        if await current_revision(engine) is None:
            fail(NO_SCHEMA.format(at=f" at {engine.url.render_as_string(hide_password=True)}"))


def open_engine() -> Any:
    """An engine on COMPENSA_DATABASE_URL; the caller disposes of it."""
    from infra.db import create_engine
    from infra.settings import get_settings

    return create_engine(get_settings().database_url)


async def open_transport(app: Any = None) -> Any:
    """The transport COMPENSA_AMQP_URL names (the in-memory broker when unset), with the queues of
    `app` (a loaded `SagaApp`; None: the order app's); the caller closes it."""
    from infra.apps import ORDER_APP, app_queues
    from infra.settings import get_settings
    from infra.transport.factory import transport_from_settings

    return await transport_from_settings(get_settings(), app_queues(app or ORDER_APP))


@contextlib.asynccontextmanager
async def database() -> AsyncIterator[Any]:
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


async def audited(engine: Any, action: str, targets: list[Any], *, outcome: str = "ok", detail: str = "", **fields: Any) -> None:
    """Record a CLI action in the audit trail, as COMPENSA_OPERATOR or the OS user."""
    from infra.audit import CLI, cli_actor, record_now
    from infra.clock import SystemClock
    from infra.settings import get_settings

    await record_now(
        engine,
        at=SystemClock().now(),
        actor=cli_actor(get_settings().operator),
        via=CLI,
        action=action,
        targets=targets,
        outcome=outcome,
        detail=detail,
        **fields,
    )


# ---------------------------------------------------------------- input


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


def confirm(action: str, *, declined: str) -> None:
    """Ask on a terminal before `action`; without one, refuse and name --yes."""
    if not sys.stdin.isatty():
        fail(f"would {action}; confirm with --yes")
    if not typer.confirm(f"{visible(action)}?", default=False, err=True):
        err.print(declined)
        raise typer.Exit(1)


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
        try:
            return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
        except OverflowError:
            fail(f"{option}: {clip(text)} is out of range once converted to UTC")
    # A linear check (no nested quantifiers: `(\d+…)+` backtracks exponentially on `1111…x`).
    if value and _DURATION_LIKE.sub("", value.lower()) == "":
        if re.fullmatch(r"[0-9.]+", value):
            # Bare digits could be seconds or a basic-format date (20260131): neither is guessed.
            fail(f"{option}: {clip(text)} has no unit; give a duration ago with one (90s, 30m, 2h) or an ISO time (2026-01-31)")
        return now - parse_duration(value, option)
    fail(expected)


def parse_dead_letter_id(text: str) -> int | None:
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
            low = parse_dead_letter_id(low_text)
            high = parse_dead_letter_id(high_text) if dash else low
            if low is None or high is None:
                if re.fullmatch(r"[0-9]+(-[0-9]+)?", part):
                    fail(f"bad dead-letter id {clip(part)}: ids are numbers from 0 to {MAX_ID}")
                fail(f"bad dead-letter id {clip(part)}: ids are numbers (12, 12,13 or 20-25); `compensa dlq list` shows them")
            if high < low:
                fail(f"bad id range {clip(part)}: the first id is the lower one (20-25)")
            if high - low + 1 > MAX_IDS or len(ids) + high - low + 1 > MAX_IDS:
                fail(
                    f"too many dead-letter ids ({part} makes more than {MAX_IDS:,}): replay or purge at most {MAX_IDS:,} "
                    "ids per command, in parts (1-10000, 10001-20000, …), or select them with a filter (--queue, --since, --all)"
                )
            ids.extend(range(low, high + 1))
    return tuple(dict.fromkeys(ids))


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


def when(moment: datetime | None, *, short: bool = False) -> str:
    """A stored time (tables hand them back timezone-aware) in UTC, or `-`."""
    return moment.astimezone(UTC).strftime("%m-%d %H:%M:%S" if short else "%Y-%m-%d %H:%M:%S") if moment else "-"


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


def load_app_or_exit(reference: str | None, *, as_json: bool = False) -> Any:
    """The saga application `--app` names (the order app when None); one `error:` line and exit 2 when it cannot load."""
    from infra.apps import AppLoadError, resolve_app

    try:
        return resolve_app(reference)
    except AppLoadError as exc:
        print_error(str(exc), as_json=as_json)
        raise typer.Exit(2) from None
