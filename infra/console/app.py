"""The operator console app: sign-in, sagas, dead letters, actions, audit, live counts.

`create_app(settings, engine=…, clock=…, saga_app=…)` builds it for a hosted saga app (the
order app by default: its queues, its sagas); `app_from_environment` is the uvicorn
factory `compensa console` serves. Pages are rendered on the server from
`templates/` (Jinja2, autoescaped); `static/console.js` refreshes the live counts and
nothing else needs script. Reads go through the read-side queries (`sagas/queries.py`,
`infra/dlq/query.py`, `infra/saga_starts.py`, `infra/audit.py`), paged by keyset.
Every POST needs a session and the CSRF token of its form; actions need the operator
role (a viewer sees no button and gets 403, which the audit records as denied).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts import REGISTRY
from contracts.clock import Clock
from infra import audit
from infra.apps import ORDER_APP, footprint, resolve_app
from infra.console import actions, timeline
from infra.console.security import (
    PRESESSION_COOKIE,
    SESSION_COOKIE,
    FormError,
    Signer,
    first,
    parse_form,
)
from infra.operators import Operator, OperatorStore
from infra.settings import Settings, get_settings
from sagas.app import SagaApp

HERE = Path(__file__).parent
PAGE = 50
#: The statuses the live counts show (counted from the status index, not by a scan of every saga).
LIVE_STATUSES = ("running", "compensation_failed")
#: The longest text filter accepted (ids are at most 64 characters).
MAX_FILTER = 64
#: The variable naming the hosted saga app (`module:attr`) to the uvicorn factory, as to every command.
APP_VARIABLE = "COMPENSA_APP"


class Stop(Exception):
    """Answer the request with this response now (sign-in needed, forbidden, bad input)."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


def _when(moment: datetime | None, short: bool = False) -> str:
    if moment is None:
        return "-"
    return moment.astimezone(UTC).strftime("%m-%d %H:%M:%S" if short else "%Y-%m-%d %H:%M:%S")


def _ago(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "-"
    seconds = max(0, int((now - moment).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _duration(text: str, name: str) -> timedelta | None:
    """A filter's duration (`90s`, `10m`, `2h`, `1d`), or None when empty."""
    import re

    value = text.strip().lower()
    if not value:
        return None
    match = re.fullmatch(r"([0-9]{1,6})(s|m|h|d)", value)
    if match is None:
        raise Stop(_plain(400, f"{name}: give a duration such as 90s, 10m, 2h or 1d, not {value[:20]!r}"))
    return timedelta(seconds=int(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)])


def _plain(status: int, message: str) -> Response:
    return HTMLResponse(f"<!doctype html><title>compensa console</title><p class=error>{_escape(message)}</p>", status)


def _escape(text: str) -> str:
    return str(Markup.escape(text))


def _safe_next(target: str) -> str:
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/sagas"


def _cursor(parts: list[str]) -> str:
    return "|".join(parts)


def _parse_time_cursor(text: str) -> tuple[datetime, str] | None:
    if not text:
        return None
    moment, _, key = text.partition("|")
    try:
        parsed = datetime.fromisoformat(moment)
    except ValueError:
        raise Stop(_plain(400, "bad page cursor")) from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)), key


class Console:
    """The routes' shared state: settings, engine, clock, signer, templates, the hosted app's orchestrator and queues."""

    def __init__(self, settings: Settings, engine: AsyncEngine, clock: Clock, app: SagaApp = ORDER_APP) -> None:
        from infra.bootstrap import orchestrator_for

        self.settings = settings
        self.engine = engine
        self.clock = clock
        self.signer = Signer(settings.console_secret or secrets.token_bytes(32))
        self.operators = OperatorStore(engine)
        self.orchestrator = orchestrator_for(settings, app=app)
        #: The work queues dead letters are filtered by and replayed to, by name.
        self.queues = {queue.name: queue for queue in footprint(app).queues}
        self.templates = Environment(
            loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]), auto_reload=False
        )
        self.templates.filters["when"] = _when
        self.templates.filters["json"] = lambda value: json.dumps(value, indent=2, ensure_ascii=False, default=str)
        self.templates.globals["quote"] = lambda value: quote(str(value), safe="")

    # ------------------------------------------------------------ sessions

    async def signed_in(self, request: Request) -> tuple[Operator, str]:
        """The operator of this request's session and its CSRF token; else redirect to sign-in."""
        session = self.signer.read(request.cookies.get(SESSION_COOKIE), self.clock.now())
        record = await self.operators.get(session.key_id) if session is not None else None
        if session is None or record is None or not record.active:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            response = RedirectResponse(f"/signin?{urlencode({'next': target})}", status_code=303)
            if request.cookies.get(SESSION_COOKIE):
                response.delete_cookie(SESSION_COOKIE, path="/")
            raise Stop(response)
        return record, self.signer.csrf(session.nonce)

    async def posted(self, request: Request) -> tuple[Operator, dict[str, list[str]]]:
        """A POST's operator and form, after the session and the form's CSRF token check out."""
        operator, _ = await self.signed_in(request)
        try:
            form = parse_form(await request.body(), request.headers.get("content-type"))
        except FormError as exc:
            raise Stop(_plain(400, str(exc))) from exc
        session = self.signer.read(request.cookies.get(SESSION_COOKIE), self.clock.now())
        if session is None or not self.signer.csrf_ok(session.nonce, first(form, "csrf")):
            raise Stop(_plain(403, "the form's CSRF token is missing or wrong: reload the page and try again"))
        return operator, form

    async def acting(self, request: Request, action: str, targets: list[Any]) -> tuple[Operator, dict[str, list[str]]]:
        """A POST that acts: also needs the operator role; a viewer's attempt is refused and audited."""
        operator, form = await self.posted(request)
        if not operator.may_act:
            await audit.record_now(
                self.engine,
                at=self.clock.now(),
                actor=operator.name,
                via=audit.CONSOLE,
                action=action,
                targets=targets or form.get("id", []),
                outcome=audit.DENIED,
                detail=f"role {operator.role} may not act; actions need the operator role",
            )
            raise Stop(_plain(403, f"{operator.name} is a {operator.role}: actions need the operator role"))
        return operator, form

    # ------------------------------------------------------------ pages

    async def render(
        self, request: Request, name: str, operator: Operator | None, csrf: str = "", status: int = 200, **context: Any
    ) -> HTMLResponse:
        live = await self.live_counts() if operator is not None else None
        html = self.templates.get_template(name).render(
            request=request,
            me=operator,
            csrf=csrf,
            live=live,
            live_stuck_for=self.stuck_for,
            now=self.clock.now(),
            ago=_ago,
            **context,
        )
        return HTMLResponse(html, status_code=status)

    @property
    def stuck_for(self) -> str:
        """How long unchanged makes a saga stuck (health_stuck_seconds, in the list filter's whole seconds).

        The live count and the badge's link to the list both use it, so they agree.
        """
        return f"{math.ceil(self.settings.health_stuck_seconds)}s"

    async def live_counts(self) -> dict[str, int]:
        from infra.dlq.query import new_count
        from sagas.queries import status_counts, stuck_count

        now = self.clock.now()
        async with self.engine.connect() as connection:
            counts = await status_counts(connection, statuses=LIVE_STATUSES)
            stuck = await stuck_count(connection, now - (_duration(self.stuck_for, "stuck for") or timedelta(0)))
            new = await new_count(connection)
        return {
            "new_dead_letters": new,
            "running": counts.get("running", 0),
            "stuck": stuck,
            "compensation_failed": counts.get("compensation_failed", 0),
        }


def create_app(
    settings: Settings | None = None,
    *,
    engine: AsyncEngine | None = None,
    clock: Clock | None = None,
    saga_app: SagaApp = ORDER_APP,
) -> FastAPI:
    """The console of `saga_app` on the settings' database (or `engine`), on the system clock (or `clock`)."""
    from infra.clock import SystemClock
    from infra.db import create_engine

    settings = settings or get_settings()
    owned = engine is None
    engine = engine or create_engine(settings.database_url, pre_ping=True)
    console = Console(settings, engine, clock or SystemClock(), saga_app)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if owned:
                await engine.dispose()

    app = FastAPI(title="compensa console", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.console = console
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.exception_handler(Stop)
    async def stop(_request: Request, exc: Stop) -> Response:
        return exc.response

    @app.exception_handler(DBAPIError)
    async def database_error(_request: Request, exc: DBAPIError) -> Response:
        text = str(exc.orig if exc.orig is not None else exc).strip().splitlines()
        first_line = text[0] if text else type(exc).__name__
        if "no such table" in first_line or ("relation" in first_line and "does not exist" in first_line):
            return _plain(503, f"the database has no compensa tables yet ({first_line}); run `compensa db upgrade`")
        return _plain(503, f"the database refused or could not be reached: {first_line}")

    @app.exception_handler(OSError)
    async def unreachable(_request: Request, exc: OSError) -> Response:
        return _plain(503, f"cannot reach the database ({exc}); check COMPENSA_DATABASE_URL and that the server runs")

    @app.middleware("http")
    async def headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault(
            "Content-Security-Policy", "default-src 'self'; img-src 'self' data:; style-src 'self'; frame-ancestors 'none'"
        )
        if request.url.path != "/static/console.js":
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    _sign_in_routes(app, console)
    _saga_routes(app, console)
    _dead_letter_routes(app, console)
    _audit_routes(app, console)
    return app


def app_from_environment() -> FastAPI:
    """The uvicorn factory `compensa console` serves: the app COMPENSA_APP names (`--app` sets it), else the order app.

    It starts telemetry as `compensa-console` (as `compensa api`'s factory does): the
    CLI leaves it to a long-running command, and without it the commands an operator's
    action sends would carry no trace context.
    """
    from infra.telemetry.setup import configure_telemetry

    settings = get_settings()
    configure_telemetry("compensa-console", metrics_port=settings.metrics_port, metrics_host=settings.metrics_host)
    return create_app(settings, saga_app=resolve_app(os.environ.get(APP_VARIABLE) or None))


# ---------------------------------------------------------------- sign-in


def _sign_in_routes(app: FastAPI, console: Console) -> None:
    @app.get("/signin", response_class=HTMLResponse)
    async def signin_page(request: Request, next: str = "/sagas") -> Response:  # noqa: A002 - the query parameter's name
        nonce = secrets.token_urlsafe(16)
        response = await console.render(
            request, "signin.html", None, csrf=console.signer.csrf(nonce), next=_safe_next(next), error=None
        )
        response.set_cookie(
            PRESESSION_COOKIE, nonce, max_age=3600, httponly=True, samesite="strict", secure=request.url.scheme == "https"
        )
        return response

    @app.post("/signin")
    async def signin(request: Request) -> Response:
        try:
            form = parse_form(await request.body(), request.headers.get("content-type"))
        except FormError as exc:
            return _plain(400, str(exc))
        nonce = request.cookies.get(PRESESSION_COOKIE)
        if not console.signer.csrf_ok(nonce, first(form, "csrf")):
            return _plain(403, "the sign-in form's CSRF token is missing or wrong: open /signin again")
        target = _safe_next(first(form, "next", "/sagas"))
        operator = await console.operators.authenticate(first(form, "token"), console.clock.now())
        if operator is None:
            return await console.render(
                request,
                "signin.html",
                None,
                csrf=console.signer.csrf(nonce or ""),
                next=target,
                error="unknown, malformed or revoked token; `compensa operators add` makes one",
                status=401,
            )
        cookie, _ = console.signer.issue(operator.key_id, console.clock.now(), console.settings.console_session_seconds)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            cookie,
            max_age=int(console.settings.console_session_seconds),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
        response.delete_cookie(PRESESSION_COOKIE)
        return response

    @app.post("/signout")
    async def signout(request: Request) -> Response:
        await console.posted(request)
        response = RedirectResponse("/signin", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    @app.get("/")
    async def home() -> Response:
        return RedirectResponse("/sagas", status_code=303)

    @app.get("/live.json")
    async def live(request: Request) -> Response:
        session = console.signer.read(request.cookies.get(SESSION_COOKIE), console.clock.now())
        if session is None:
            return JSONResponse({"error": "sign in"}, status_code=401)
        record = await console.operators.get(session.key_id)
        if record is None or not record.active:
            return JSONResponse({"error": "sign in"}, status_code=401)
        return JSONResponse(await console.live_counts())


# ---------------------------------------------------------------- sagas


def _saga_routes(app: FastAPI, console: Console) -> None:
    from sagas import SagaStatus

    statuses = [s.value for s in SagaStatus]

    @app.get("/sagas", response_class=HTMLResponse)
    async def sagas(
        request: Request,
        status: str = "",
        saga_type: str = "",
        older_than: str = "",
        stuck_for: str = "",
        q: str = "",
        after: str = "",
    ) -> Response:
        from infra.saga_starts import orders_without_saga
        from sagas.queries import page_sagas, status_counts

        operator, csrf = await console.signed_in(request)
        if status and status not in statuses:
            return _plain(400, f"unknown status {status[:40]!r}; choose from {', '.join(statuses)}")
        if saga_type and saga_type not in console.orchestrator.definitions:
            return _plain(400, f"unknown saga type {saga_type[:40]!r}; choose from {', '.join(console.orchestrator.definitions)}")
        if len(q) > MAX_FILTER:
            return _plain(400, f"search: at most {MAX_FILTER} characters (a saga id's length)")
        now = console.clock.now()
        age = _duration(older_than, "age")
        stuck = _duration(stuck_for, "stuck for")
        cursor = _parse_time_cursor(after)
        async with console.engine.connect() as connection:
            rows = await page_sagas(
                connection,
                status=status or None,
                definition=saga_type or None,
                started_before=now - age if age else None,
                unfinished_since=now - stuck if stuck else None,
                id_prefix=q.strip() or None,
                after=cursor,
                limit=PAGE + 1,
            )
            counts = await status_counts(connection)
            unstarted = (
                (await orders_without_saga(connection, now, stuck, PAGE)).orders() if stuck and not status and not after else []
            )
        more = len(rows) > PAGE
        rows = rows[:PAGE]
        filters = {"status": status, "saga_type": saga_type, "older_than": older_than, "stuck_for": stuck_for, "q": q}
        next_url = None
        if more:
            last = rows[-1]
            query = {k: v for k, v in filters.items() if v}
            query["after"] = _cursor([last["updated_at"].isoformat(), last["saga_id"]])
            next_url = "/sagas?" + urlencode(query)
        return await console.render(
            request,
            "sagas.html",
            operator,
            csrf,
            rows=rows,
            counts=counts,
            statuses=statuses,
            saga_types=list(console.orchestrator.definitions),
            filters=filters,
            next_url=next_url,
            unstarted=unstarted,
        )

    @app.get("/sagas/{saga_id}", response_class=HTMLResponse)
    async def saga_page(request: Request, saga_id: str) -> Response:
        from infra.dlq.query import dead_letters_of_saga
        from sagas.queries import get_saga, saga_history

        operator, csrf = await console.signed_in(request)
        async with console.engine.connect() as connection:
            saga = await get_saga(connection, saga_id)
            if saga is not None:
                history = await saga_history(connection, saga_id)
                letters = await dead_letters_of_saga(connection, saga_id)
                done = await audit.list_audit(connection, audit.AuditFilter(saga_id=saga_id), limit=200)
        if saga is None:
            return await console.render(request, "missing.html", operator, csrf, what=f"saga {saga_id}", status=404)
        deadline = (
            {"at": saga["deadline_at"], "kind": saga["deadline_kind"], "step": saga["deadline_step"]}
            if saga["deadline_at"]
            else None
        )
        svg = timeline.render(timeline.rows(history, letters, list(reversed(done))), deadline)
        try:
            data = json.loads(saga["data"])
        except ValueError:
            data = saga["data"]
        return await console.render(
            request,
            "saga.html",
            operator,
            csrf,
            saga=saga,
            data=data,
            history=history,
            letters=letters,
            actions=done,
            svg=Markup(svg),  # noqa: S704 - built by timeline.render, which escapes every stored text
            deadline=deadline,
        )

    @app.get("/sagas/{saga_id}/{kind}", response_class=HTMLResponse)
    async def saga_confirm(request: Request, saga_id: str, kind: str) -> Response:
        from sagas.queries import get_saga

        operator, csrf = await console.signed_in(request)
        if kind not in ("retry", "cancel"):
            return _plain(404, "no such page")
        if not operator.may_act:
            return _plain(403, f"{operator.name} is a {operator.role}: actions need the operator role")
        async with console.engine.connect() as connection:
            saga = await get_saga(connection, saga_id)
        if saga is None:
            return await console.render(request, "missing.html", operator, csrf, what=f"saga {saga_id}", status=404)
        return await console.render(request, "saga_confirm.html", operator, csrf, saga=saga, kind=kind, error=None)

    @app.post("/sagas/{saga_id}/{kind}", response_class=HTMLResponse)
    async def saga_act(request: Request, saga_id: str, kind: str) -> Response:
        if kind not in ("retry", "cancel"):
            return _plain(404, "no such action")
        operator, form = await console.acting(request, f"saga.{kind}", [saga_id])
        reason = first(form, "reason").strip()
        _, csrf = await console.signed_in(request)
        if kind == "cancel" and not reason:
            from sagas.queries import get_saga

            async with console.engine.connect() as connection:
                saga = await get_saga(connection, saga_id)
            return await console.render(
                request,
                "saga_confirm.html",
                operator,
                csrf,
                saga=saga,
                kind=kind,
                error="give a reason: it is recorded in the saga's history, on the order and in the audit trail",
                status=400,
            )
        if len(reason) > 500:
            return _plain(400, "the reason is longer than 500 characters")
        try:
            transition = await actions.saga_action(
                console.engine, console.clock, console.orchestrator, saga_id, kind, operator.name, reason
            )
        except actions.Refused as exc:
            return await console.render(
                request,
                "result.html",
                operator,
                csrf,
                title=f"saga {kind} refused",
                refused=str(exc),
                saga_id=saga_id,
                status=409,
            )
        sent = [payload.message_type for payload in transition.outgoing]
        return await console.render(
            request,
            "result.html",
            operator,
            csrf,
            title=f"saga {kind}",
            refused=None,
            saga_id=saga_id,
            message=f"saga {saga_id} is now {transition.state.status.value}; "
            + (f"sent {', '.join(sent)} (a running relay delivers them)" if sent else transition.note),
        )


# ---------------------------------------------------------------- dead letters


def _group_filter(queues: list[str], queue: str, reason_class: str, type_: str, status: str) -> Any:
    from infra.dlq.query import DeadLetterFilter
    from infra.dlq.tables import STATUSES, UNDECODABLE

    if queue and queue not in queues:
        raise Stop(_plain(400, f"unknown queue {queue[:40]!r}; choose from {', '.join(queues)}"))
    if type_ and type_ not in [*REGISTRY.types(), UNDECODABLE]:
        raise Stop(_plain(400, f"unknown message type {type_[:40]!r}"))
    if status and status not in STATUSES:
        raise Stop(_plain(400, f"unknown status {status[:40]!r}; choose from {', '.join(STATUSES)}"))
    if len(reason_class) > MAX_FILTER:
        raise Stop(_plain(400, "reason class: at most 64 characters"))
    return DeadLetterFilter(queue=queue or None, reason_class=reason_class or None, type=type_ or None, status=status or None)


def _dead_letter_routes(app: FastAPI, console: Console) -> None:
    from infra.dlq.tables import STATUSES

    @app.get("/dead-letters", response_class=HTMLResponse)
    async def groups(request: Request, status: str = "new") -> Response:
        from infra.dlq.query import failure_groups_by_type

        operator, csrf = await console.signed_in(request)
        where = _group_filter(list(console.queues), "", "", "", status)
        async with console.engine.connect() as connection:
            found = await failure_groups_by_type(connection, where)
        return await console.render(
            request, "groups.html", operator, csrf, groups=found, chosen=status, statuses=STATUSES, urlencode=urlencode
        )

    @app.get("/dead-letters/group", response_class=HTMLResponse)
    async def group(
        request: Request,
        queue: str = "",
        reason_class: str = "",
        type: str = "",  # noqa: A002 - the query parameter's name
        status: str = "new",
        after: str = "",
    ) -> Response:
        from infra.dlq.query import count_dead_letters, page_dead_letters

        operator, csrf = await console.signed_in(request)
        where = _group_filter(list(console.queues), queue, reason_class, type, status)
        cursor = None
        if after:
            moment, key = _parse_time_cursor(after) or (None, "")
            if moment is None or not key.isdigit():
                return _plain(400, "bad page cursor")
            cursor = (moment, int(key))
        async with console.engine.connect() as connection:
            rows = await page_dead_letters(connection, where, after=cursor, limit=PAGE + 1)
            total = await count_dead_letters(connection, where)
        more = len(rows) > PAGE
        rows = rows[:PAGE]
        params = {"queue": queue, "reason_class": reason_class, "type": type, "status": status}
        next_url = None
        if more:
            last = rows[-1]
            next_url = "/dead-letters/group?" + urlencode(
                {**params, "after": _cursor([last["last_failure_at"].isoformat(), str(last["id"])])}
            )
        return await console.render(
            request, "group.html", operator, csrf, rows=rows, total=total, params=params, next_url=next_url
        )

    @app.get("/dead-letters/{dead_letter_id}", response_class=HTMLResponse)
    async def dead_letter(request: Request, dead_letter_id: str) -> Response:
        from infra.dlq.query import get_dead_letter
        from sagas.queries import saga_summary

        operator, csrf = await console.signed_in(request)
        if not dead_letter_id.isdigit() or len(dead_letter_id) > 18:
            return _plain(400, f"bad dead-letter id {dead_letter_id[:30]!r}: ids are numbers")
        async with console.engine.connect() as connection:
            letter = await get_dead_letter(connection, int(dead_letter_id))
            saga = await saga_summary(connection, letter["saga_id"]) if letter is not None else None
        if letter is None:
            return await console.render(request, "missing.html", operator, csrf, what=f"dead letter {dead_letter_id}", status=404)
        body = letter["body"]
        payload = body.get("payload", body) if isinstance(body, dict) else body
        return await console.render(request, "dead_letter.html", operator, csrf, letter=letter, payload=payload, saga=saga)

    async def selection(form: dict[str, list[str]]) -> list[int]:
        """The dead letters a form names: ticked ids, an id list, or a whole group (its `new` ones)."""
        from infra.dlq.query import matching_ids

        if first(form, "scope") == "group":
            where = _group_filter(
                list(console.queues), first(form, "queue"), first(form, "reason_class"), first(form, "type"), "new"
            )
            async with console.engine.connect() as connection:
                ids = await matching_ids(connection, where)
            if len(ids) > actions.MAX_IDS:
                raise actions.Refused(f"the group holds {len(ids):,} dead letters; act on at most {actions.MAX_IDS:,} at once")
            return ids
        return actions.parse_ids([*form.get("id", []), *form.get("ids", [])])

    @app.post("/dead-letters/replay/preview", response_class=HTMLResponse)
    async def replay_preview(request: Request) -> Response:
        operator, form = await console.acting(request, "dlq.replay", [])
        _, csrf = await console.signed_in(request)
        try:
            ids = await selection(form)
            patch = actions.parse_patch(first(form, "patch"))
            preview = await actions.preview_replay(console.engine, console.clock, ids, patch, console.queues)
        except actions.Refused as exc:
            return await console.render(
                request, "result.html", operator, csrf, title="replay refused", refused=str(exc), saga_id=None, status=400
            )
        return await console.render(
            request,
            "replay_preview.html",
            operator,
            csrf,
            preview=preview,
            patch_text=first(form, "patch"),
            ids_text=actions.ids_text(preview.replayable),
        )

    @app.post("/dead-letters/replay", response_class=HTMLResponse)
    async def replay_confirmed(request: Request) -> Response:
        operator, form = await console.acting(request, "dlq.replay", [])
        _, csrf = await console.signed_in(request)
        try:
            ids = actions.parse_ids(form.get("ids", []))
            patch = actions.parse_patch(first(form, "patch"))
            summary = await actions.replay_now(console.engine, console.clock, ids, patch, operator.name, console.queues)
        except actions.Refused as exc:
            return await console.render(
                request, "result.html", operator, csrf, title="replay refused", refused=str(exc), saga_id=None, status=400
            )
        return await console.render(request, "replay_done.html", operator, csrf, summary=summary)

    @app.post("/dead-letters/purge/preview", response_class=HTMLResponse)
    async def purge_preview(request: Request) -> Response:
        from infra.dlq.query import DeadLetterFilter, list_dead_letters

        operator, form = await console.acting(request, "dlq.purge", [])
        _, csrf = await console.signed_in(request)
        try:
            ids = await selection(form)
            if not ids:
                raise actions.Refused("no dead letters selected")
        except actions.Refused as exc:
            return await console.render(
                request, "result.html", operator, csrf, title="purge refused", refused=str(exc), saga_id=None, status=400
            )
        async with console.engine.connect() as connection:
            rows = await list_dead_letters(connection, DeadLetterFilter(ids=tuple(ids[:5000])), limit=200)
        return await console.render(
            request, "purge_preview.html", operator, csrf, rows=rows, count=len(ids), ids_text=actions.ids_text(ids)
        )

    @app.post("/dead-letters/purge", response_class=HTMLResponse)
    async def purge_confirmed(request: Request) -> Response:
        operator, form = await console.acting(request, "dlq.purge", [])
        _, csrf = await console.signed_in(request)
        try:
            ids = actions.parse_ids(form.get("ids", []))
            purged = await actions.purge_now(console.engine, console.clock, ids, operator.name)
        except actions.Refused as exc:
            return await console.render(
                request, "result.html", operator, csrf, title="purge refused", refused=str(exc), saga_id=None, status=400
            )
        return await console.render(
            request,
            "result.html",
            operator,
            csrf,
            title="purged",
            refused=None,
            saga_id=None,
            message=f"purged {purged} dead letters; they stay in the archive with status purged",
        )


# ---------------------------------------------------------------- audit


def _audit_routes(app: FastAPI, console: Console) -> None:
    @app.get("/audit", response_class=HTMLResponse)
    async def audit_page(
        request: Request, actor: str = "", action: str = "", saga: str = "", outcome: str = "", before: str = ""
    ) -> Response:
        operator, csrf = await console.signed_in(request)
        if any(len(v) > 128 for v in (actor, action, saga, outcome)):
            return _plain(400, "filters are at most 128 characters")
        if before and not (before.isdigit() and len(before) <= 18):
            return _plain(400, "bad page cursor")
        if outcome and outcome not in audit.OUTCOMES:
            return _plain(400, f"unknown outcome; choose from {', '.join(audit.OUTCOMES)}")
        where = audit.AuditFilter(actor=actor or None, action=action or None, saga_id=saga or None, outcome=outcome or None)
        async with console.engine.connect() as connection:
            rows = await audit.list_audit(connection, where, before_id=int(before) if before else None, limit=PAGE + 1)
        more = len(rows) > PAGE
        rows = rows[:PAGE]
        filters = {"actor": actor, "action": action, "saga": saga, "outcome": outcome}
        next_url = None
        if more:
            next_url = "/audit?" + urlencode({**{k: v for k, v in filters.items() if v}, "before": rows[-1]["id"]})
        return await console.render(
            request, "audit.html", operator, csrf, rows=rows, filters=filters, outcomes=audit.OUTCOMES, next_url=next_url
        )
