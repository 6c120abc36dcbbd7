"""Health: database, broker, queues, redis (when configured), relay lag, sagas, dead letters, circuit breakers.

`check_health(settings)` runs every check at once, each bounded by a timeout, and
returns a JSON-able report with a `status`:

- `unhealthy` when a dependency is unreachable, the schema is behind, the topology is
  missing, the relay lags too far behind, a work queue is wedged (unacknowledged
  messages and no ack over the observation window, or ready messages and no consumer
  over it), an order waits for its saga longer than the bound, or a saga deadline is
  overdue by more than the bound (no sweeper runs);
- `degraded` when nothing of compensa's is known to be wrong but something could not
  be observed (the broker's management API, queue statistics, did not answer) or an
  outside dependency is failing: a running process's circuit breaker on the payment
  gateway is open or half-open (charges and refunds wait in the delay queues). Rows of
  breakers not refreshed for `STALE_AFTER_SECONDS` belong to stopped processes: they are
  listed, never counted;
- `healthy` otherwise. `ok` is true only when healthy: a check that could not look
  never counts as a pass.

Dead letters never make the service unhealthy (they are the operator's work, not
an outage); they are counted and reported as warnings.

The queues, dead-letter queues and outboxes checked are the hosted app's
(`infra.apps.footprint`; the order app's by default). Another app's starts come
from upstream, so the `saga_starts` check (orders without a saga) is the order app's.

`router` serves it as `GET /health` (200 healthy, 503 unhealthy) for container
checks; `health_app()` is a standalone app for `compensa health --serve`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from alembic.script import ScriptDirectory
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from contracts.messages import OrderCreated
from infra import topology as t
from infra.apps import ORDER_APP, Footprint, footprint
from infra.circuit_breakers import STALE_AFTER_SECONDS, breaker_rows
from infra.dlq.query import open_counts
from infra.saga_starts import orders_without_saga
from infra.schema import alembic_config
from infra.settings import Settings, derive_management_url, get_settings
from outbox.uow import pending_summary
from sagas.app import SagaApp
from sagas.tables import saga_instances

#: Default: a pending outbox row older than this means the relay is not keeping up.
MAX_RELAY_LAG_SECONDS = 60.0
CHECK_TIMEOUT_SECONDS = 5.0
#: How many of the oldest stuck orders / overdue sagas a report names.
SHOWN = 5
#: The management plugin keeps queue samples at 5 s granularity for about ten minutes
#: (its default `basic` retention policy); a longer observation window has no data.
MAX_WEDGE_WINDOW_SECONDS = 600.0
#: The queues the saga service reads `order.created` from.
SAGA_START_QUEUES = tuple(q.name for q in t.WORK_QUEUES if q.service == "saga" and OrderCreated.message_type in q.routing_keys)
MANAGEMENT_FIX = (
    "enable RabbitMQ's rabbitmq_management plugin and set COMPENSA_AMQP_MANAGEMENT_URL "
    "(http://user:password@host:15672/; the user needs the monitoring or management tag)"
)


def _safe(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown without its credentials
        return url.split("@")[-1]


def _error(exc: BaseException) -> str:
    text_ = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text_}" if text_ else type(exc).__name__


def _printable(value: str, limit: int = 64) -> str:
    """A stored identifier as one line of text: control characters replaced, bounded."""
    shown = "".join(c if c.isprintable() else "\ufffd" for c in value)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


async def _timed(
    check: Callable[[], Awaitable[dict[str, Any]]], timeout: float, fix: str, *, unavailable: str | None = None
) -> dict[str, Any]:
    """Run one check within `timeout`; with `unavailable`, a failure means "could not look" (degraded)."""
    started = time.perf_counter()
    try:
        result = await asyncio.wait_for(check(), timeout)
    except TimeoutError:
        result = {"ok": False, "error": f"no answer within {timeout:.0f}s", "fix": fix}
    except Exception as exc:  # noqa: BLE001 - a failing check is reported, not raised
        result = {"ok": False, "error": _error(exc), "fix": fix}
    else:
        unavailable = None  # the check ran: its own verdict stands
    if unavailable:
        result = {**result, "unavailable": True, "error": f"{unavailable}: {result['error']}"}
    result["latency_ms"] = round((time.perf_counter() - started) * 1000, 1)
    return result


async def _database(
    engine: AsyncEngine, settings: Settings, max_relay_lag: float, stuck_seconds: float, app: SagaApp
) -> dict[str, Any]:
    async with engine.connect() as connection:
        await connection.execute(text("SELECT 1"))
        revision = await connection.run_sync(_current_revision)
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    database: dict[str, Any] = {"ok": revision == head, "url": _safe(settings.database_url), "revision": revision, "head": head}
    if revision != head:
        database["error"] = f"schema at revision {revision}, code expects {head}"
        database["fix"] = "run `compensa db upgrade`"
        return {"database": database}
    now = datetime.now(UTC)
    outboxes = [await pending_summary(engine, name, now) for name in footprint(app).outboxes]
    lag = max((o["oldest_pending_age_seconds"] for o in outboxes), default=0.0)
    relay = {
        "ok": lag <= max_relay_lag,
        "max_lag_seconds": round(lag, 3),
        "limit_seconds": max_relay_lag,
        "pending": sum(o["pending"] for o in outboxes),
        "outboxes": {
            o["service"]: {"pending": o["pending"], "oldest_pending_age_seconds": round(o["oldest_pending_age_seconds"], 3)}
            for o in outboxes
        },
    }
    if not relay["ok"]:
        relay["error"] = f"oldest pending outbox row is {lag:.0f}s old (limit {max_relay_lag:.0f}s)"
        relay["fix"] = "start or scale `compensa relay` (or `compensa run`), and check the broker"
    async with engine.connect() as connection:
        archived = await open_counts(connection)
        saga_starts = await _saga_starts(connection, now, stuck_seconds) if app is ORDER_APP else None
        deadlines = await _overdue_deadlines(connection, now, stuck_seconds)
        breakers = await _circuit_breakers(connection, now)
    return {
        "database": database,
        "relay": relay,
        "archived": archived,
        **({"saga_starts": saga_starts} if saga_starts is not None else {}),
        "deadlines": deadlines,
        "circuit_breakers": breakers,
    }


def _age(now: datetime, moment: datetime) -> float:
    return round((now - moment).total_seconds(), 3)


async def _saga_starts(connection: AsyncConnection, now: datetime, bound: float) -> dict[str, Any]:
    """Orders that entered more than `bound` seconds ago and have no saga (`infra/saga_starts.py`)."""
    found = await orders_without_saga(connection, now, timedelta(seconds=bound), SHOWN)
    pending_count, sent = found.pending_count, found.sent_by_outbox
    oldest_pending = found.pending
    oldest_sent = [(u.order_id, u.entered_at, u.source) for u in found.sent]

    report: dict[str, Any] = {
        "ok": pending_count == 0 and not any(sent.values()),
        "limit_seconds": bound,
        "pending_orders_without_saga": {
            "count": pending_count,
            "oldest": [{"order_id": u.order_id, "age_seconds": _age(now, u.entered_at)} for u in oldest_pending],
        },
        "sent_order_created_without_saga": {
            "count": sum(sent.values()),
            "by_outbox": sent,
            "oldest": [
                {"correlation_id": cid, "sent_seconds_ago": _age(now, at), "outbox": service} for cid, at, service in oldest_sent
            ],
        },
    }
    if not report["ok"]:
        problems = []
        if pending_count:
            ids = ", ".join(_printable(u.order_id) for u in oldest_pending)
            problems.append(f"{pending_count} pending orders have no saga after {bound:g}s (oldest: {ids})")
        if any(sent.values()):
            ids = ", ".join(_printable(cid) for cid, _, _ in oldest_sent)
            problems.append(f"{sum(sent.values())} order.created sent more than {bound:g}s ago started no saga (oldest: {ids})")
        report["error"] = "; ".join(problems)
        queues = ", ".join(SAGA_START_QUEUES)
        report["fix"] = (
            f"check that the saga service runs (`compensa run --service saga`) and consumes {queues} "
            f"(see the queues check, and `compensa dlq list --queue {SAGA_START_QUEUES[0]}` for starts it refused)"
        )
    return report


async def _overdue_deadlines(connection: AsyncConnection, now: datetime, bound: float) -> dict[str, Any]:
    """Saga deadlines overdue by more than `bound` seconds: the sweeper is not running."""
    s = saga_instances.c
    overdue = s.deadline_at < now - timedelta(seconds=bound)
    count = (await connection.execute(select(func.count()).select_from(saga_instances).where(overdue))).scalar_one()
    oldest = (
        await connection.execute(
            select(s.saga_id, s.deadline_at.label("due_at"), s.deadline_kind.label("kind"), s.deadline_step.label("step"))
            .where(overdue)
            .order_by(s.deadline_at, s.saga_id)
            .limit(SHOWN)
        )
    ).all()
    report: dict[str, Any] = {
        "ok": count == 0,
        "limit_seconds": bound,
        "overdue": count,
        "max_overdue_seconds": _age(now, oldest[0].due_at) if oldest else 0.0,
        "oldest": [
            {"saga_id": row.saga_id, "overdue_seconds": _age(now, row.due_at), "kind": row.kind, "step": row.step}
            for row in oldest
        ],
    }
    if count:
        ids = ", ".join(_printable(row.saga_id) for row in oldest)
        report["error"] = (
            f"{count} saga deadlines overdue by more than {bound:g}s, up to {report['max_overdue_seconds']:.0f}s (oldest: {ids})"
        )
        report["fix"] = "run the deadline sweeper: it runs with the saga service (`compensa run --service saga`)"
    return report


def _tripped(view: dict[str, Any]) -> str:
    """One open or half-open breaker in a line: where, since when, why, and the failures in a row."""
    line = (
        f"{view['circuit']} circuit {view['state'].replace('_', '-')} in {view['holder']} since {view['since']}: {view['reason']}"
    )
    count = f"{view['failures']} transient failures in a row"
    return line if count in view["reason"] else f"{line} ({count})"


async def _circuit_breakers(connection: AsyncConnection, now: datetime) -> dict[str, Any]:
    """Circuit breakers as their processes recorded them (infra/circuit_breakers.py); open or half-open ones degrade."""
    live: list[dict[str, Any]] = []
    stale: list[dict[str, Any]] = []
    for row in await breaker_rows(connection):
        view: dict[str, Any] = {
            "circuit": _printable(row.circuit),
            "holder": _printable(row.holder, 255),
            "state": _printable(row.state),
            "since": row.since.isoformat(),
            "seconds_in_state": _age(now, row.since),
            "failures": row.failures,
            "reason": _printable(row.reason, 200),
            "updated_seconds_ago": _age(now, row.updated_at),
        }
        if (now - row.updated_at).total_seconds() <= STALE_AFTER_SECONDS:
            live.append(view)
        elif row.state != "closed":
            stale.append(view)
    tripped = [view for view in live if view["state"] != "closed"]
    report: dict[str, Any] = {"ok": not tripped, "stale_after_seconds": STALE_AFTER_SECONDS, "circuits": live, "stale": stale}
    if tripped:
        report["degraded"] = True
        report["error"] = "; ".join(_tripped(view) for view in tripped)
        report["fix"] = (
            "the payment gateway is failing: charges and refunds wait in the delay queues (past the retries they are "
            "dead-lettered and their sagas compensate); check the gateway, and the payments log (circuit_breaker.*)"
        )
    return report


def _current_revision(sync_connection: Any) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(sync_connection).get_current_revision()


async def _broker(settings: Settings, hosted: Footprint, app_reference: str | None = None) -> dict[str, Any]:
    if not settings.amqp_url:
        return {"ok": True, "kind": "in-memory", "note": "COMPENSA_AMQP_URL unset: in-process broker, nothing to check"}
    import aio_pika

    # aiormq logs a failed connect at ERROR; the report already says it.
    logging.getLogger("aiormq.connection").setLevel(logging.CRITICAL)
    connection = await aio_pika.connect(settings.amqp_url, timeout=CHECK_TIMEOUT_SECONDS)
    try:
        missing, depths = [], {}
        for queue in hosted.queues:
            for name in (queue.name, queue.dlq):
                # A passive declare of a missing queue closes the channel: one channel each.
                channel = await connection.channel()
                try:
                    declared = await channel.declare_queue(name, passive=True)
                    depths[name] = declared.declaration_result.message_count
                except aio_pika.exceptions.ChannelClosed:
                    missing.append(name)
                finally:
                    if not channel.is_closed:
                        await channel.close()
    finally:
        await connection.close()
    result: dict[str, Any] = {"ok": not missing, "kind": "rabbitmq", "url": _safe(settings.amqp_url), "queues": depths}
    if missing:
        result["error"] = f"missing queues: {', '.join(missing)}"
        named = "" if hosted.queues == t.WORK_QUEUES else f" --app {app_reference or '<module:attribute of the app>'}"
        result["fix"] = f"run `compensa topology declare{named}`"
    return result


def _vhost(amqp_url: str) -> str:
    """The virtual host of an AMQP URL, as RabbitMQ names it (`/` when the path is empty)."""
    path = urlsplit(amqp_url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def management_endpoint(url: str) -> tuple[str, tuple[str, str], str]:
    """Base URL without credentials, basic-auth pair, and the URL as shown (password hidden)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"COMPENSA_AMQP_MANAGEMENT_URL must be http(s)://user:password@host:port/, not {parts.scheme or '?'}://…"
        )
    user, password = unquote(parts.username or "guest"), unquote(parts.password or "guest")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    hostport = f"{host}:{parts.port}" if parts.port else host
    base = f"{parts.scheme}://{hostport}{parts.path.rstrip('/')}"
    return base, (user, password), f"{parts.scheme}://{quote(user, safe='')}:***@{hostport}{parts.path or '/'}"


def _samples(details: Any, since_ms: float) -> list[float] | None:
    """Sample values of a management `*_details` object at or after `since_ms`, or None without samples."""
    if not isinstance(details, dict) or not isinstance(details.get("samples"), list) or not details["samples"]:
        return None
    points = [
        (s["timestamp"], s["sample"]) for s in details["samples"] if isinstance(s, dict) and "timestamp" in s and "sample" in s
    ]
    if not points or min(ts for ts, _ in points) > since_ms:
        return None  # the broker holds no sample that old: the window is not covered
    return [value for ts, value in points if ts >= since_ms]


def _queue_view(queue: dict[str, Any], window: float, *, work: bool) -> dict[str, Any]:
    """One queue's counts and rates, and whether it is wedged over `window` seconds.

    Wedged: unacknowledged messages in every length sample of the window and the
    cumulative ack counter flat over it; or ready messages in every sample of the
    window and no consumer now. Samples are the broker's own history, so one request
    observes the whole window; a window the broker has no history for is not judged.
    """
    stats = queue.get("message_stats") or {}
    view: dict[str, Any] = {
        "ready": int(queue.get("messages_ready") or 0),
        "unacked": int(queue.get("messages_unacknowledged") or 0),
        "consumers": int(queue.get("consumers") or 0),
        "ack_rate": (stats.get("ack_details") or {}).get("rate", 0.0),
        "deliver_rate": (stats.get("deliver_get_details") or {}).get("rate", 0.0),
        "idle_since": queue.get("idle_since"),
        "wedged": False,
    }
    newest = [
        s["timestamp"]
        for key in ("messages_unacknowledged_details", "messages_ready_details")
        for s in (queue.get(key) or {}).get("samples") or []
        if isinstance(s, dict) and "timestamp" in s
    ]
    since_ms = (max(newest) if newest else 0) - window * 1000
    if view["unacked"]:
        unacked = _samples(queue.get("messages_unacknowledged_details"), since_ms)
        if "ack_details" in stats:  # noqa: SIM108 - the else branch needs its comment
            acks = _samples(stats["ack_details"], since_ms)
        else:  # rates are collected (message_stats present) and this queue never saw an ack
            acks = [0] if stats else None
        if unacked is None or acks is None:
            view["unknown"] = "no sample history for this window yet"
        elif min(unacked) > 0 and max([*acks, stats.get("ack", 0)]) == min(acks):
            view["wedged"] = True
            view["reason"] = f"{view['unacked']} unacknowledged, no ack for {window:g}s"
    if not view["wedged"] and view["ready"] and not view["consumers"] and work:
        ready = _samples(queue.get("messages_ready_details"), since_ms)
        if ready is None:
            view["unknown"] = "no sample history for this window yet"
        elif min(ready) > 0:
            view["wedged"] = True
            view["wedge"] = "ready"
            view["reason"] = f"{view['ready']} ready, no consumer for {window:g}s"
    return view


async def _queue_stats(settings: Settings, window: float, hosted: Footprint) -> dict[str, Any]:
    """Per work queue and DLQ: ready, unacked, consumers, rates; wedged queues are unhealthy."""
    if not settings.amqp_url:
        return {"ok": True, "kind": "in-memory", "note": "COMPENSA_AMQP_URL unset: in-process broker, nothing to check"}
    import httpx

    url = settings.amqp_management_url or derive_management_url(settings.amqp_url)
    base, auth, shown = management_endpoint(url)
    vhost = _vhost(settings.amqp_url)
    window = min(window, MAX_WEDGE_WINDOW_SECONDS)
    step = max(1, math.ceil(window / 12))
    age = math.ceil(window) + 2 * step  # the window plus the samples' lag behind now
    params = {"lengths_age": age, "lengths_incr": step, "msg_rates_age": age, "msg_rates_incr": step}
    # httpx logs every request URL at INFO; the credentials travel as a header, not in the URL.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    async with httpx.AsyncClient(auth=auth, timeout=CHECK_TIMEOUT_SECONDS) as client:
        response = await client.get(f"{base}/api/queues/{quote(vhost, safe='')}", params=params)
    if response.status_code in (401, 403):
        raise PermissionError(f"{response.status_code} from {shown}: the user may not read queue statistics of vhost {vhost!r}")
    if response.status_code == 404:
        raise LookupError(f"404 from {shown}: no vhost {vhost!r} (or not a RabbitMQ management API)")
    response.raise_for_status()
    answer = response.json()
    if not isinstance(answer, list):
        raise TypeError(f"{shown} answered {type(answer).__name__}, not a list of queues")
    listed = {q.get("name"): q for q in answer if isinstance(q, dict)}
    queues: dict[str, Any] = {}
    dlqs: dict[str, Any] = {}
    unknown: list[str] = []
    for spec in hosted.queues:
        for name, work in ((spec.name, True), (spec.dlq, False)):
            if name not in listed:
                # Missing from the broker too: the broker check says so. Present there and
                # not here: this API may be another broker's; either way, nothing observed.
                unknown.append(name)
                continue
            view = _queue_view(listed[name], window, work=work)
            (queues if work else dlqs)[name] = view
            if view.get("unknown") and (work or view["unacked"]):
                unknown.append(name)
    result: dict[str, Any] = {
        "kind": "rabbitmq",
        "management_url": shown,
        "vhost": vhost,
        "window_seconds": window,
        "queues": queues,
        "dlqs": dlqs,
        "unknown": unknown,
    }
    return _queues_verdict(result)


def _queues_verdict(result: dict[str, Any]) -> dict[str, Any]:
    """Set `ok`, `wedged`, and the error and fix of a queue statistics report from its views."""
    for key in ("error", "fix", "unavailable"):
        result.pop(key, None)
    wedged = {name: v["reason"] for name, v in result["queues"].items() if v["wedged"]}
    unknown = result["unknown"]
    result["ok"] = not wedged and not unknown
    result["wedged"] = sorted(wedged)
    if wedged:
        result["error"] = "wedged: " + "; ".join(f"{name}: {reason}" for name, reason in sorted(wedged.items()))
        result["fix"] = (
            "a consumer holds messages without acknowledging them, or none is consuming: "
            "restart that service (`compensa run --service …`) and look at its log"
        )
    elif unknown:
        result["unavailable"] = True
        result["error"] = (
            f"broker queue stats unavailable: no statistics covering {result['window_seconds']:g}s for {', '.join(unknown)}"
        )
        result["fix"] = (
            "wait for the management plugin to collect statistics; check that COMPENSA_AMQP_MANAGEMENT_URL "
            "is the broker of COMPENSA_AMQP_URL and that management.rates_mode is not none"
        )
    return result


def _drop_stale_wedges(report: dict[str, Any], live_ready: dict[str, int]) -> None:
    """Clear a wedge by ready messages that a live count contradicts.

    Management statistics trail the broker by a collection interval or more: a queue
    purged or drained a moment ago still shows its old ready count there. The passive
    declare of the broker check counts ready messages now, so a queue it finds empty
    is not wedged, whatever the samples say.
    """
    stale = [
        name for name, view in report.get("queues", {}).items() if view.get("wedge") == "ready" and live_ready.get(name) == 0
    ]
    for name in stale:
        view = report["queues"][name]
        view.update(wedged=False, ready=0, note="statistics showed ready messages; the queue is empty now")
        del view["wedge"], view["reason"]
    if stale:
        _queues_verdict(report)


async def _redis(settings: Settings) -> dict[str, Any]:
    if not settings.redis_url:
        return {"ok": True, "configured": False}
    import redis.asyncio as redis

    client = redis.from_url(settings.redis_url, socket_connect_timeout=CHECK_TIMEOUT_SECONDS)
    try:
        await client.ping()
    finally:
        await client.aclose()
    return {"ok": True, "configured": True, "url": _safe(settings.redis_url)}


async def check_health(
    settings: Settings,
    *,
    engine: AsyncEngine | None = None,
    max_relay_lag_seconds: float = MAX_RELAY_LAG_SECONDS,
    stuck_seconds: float | None = None,
    timeout: float = CHECK_TIMEOUT_SECONDS,
    app: SagaApp = ORDER_APP,
    app_reference: str | None = None,
) -> dict[str, Any]:
    """Check every dependency at once; return the report (`ok` true only when healthy).

    `stuck_seconds` (default `settings.health_stuck_seconds`) bounds how long an order
    may wait for its saga, a deadline stay unfired, and a queue go without acks. The
    queues and outboxes checked are `app`'s (`infra.apps.footprint`); `app_reference`,
    its `module:attribute`, goes into the commands a fix names.
    """
    from infra.db import create_engine

    hosted = footprint(app)
    stuck = settings.health_stuck_seconds if stuck_seconds is None else stuck_seconds
    own_engine = engine is None
    engine = engine or create_engine(settings.database_url)
    try:
        db_fix = "check COMPENSA_DATABASE_URL and that the database server runs"
        db, broker, queues, redis_ = await asyncio.gather(
            _timed(lambda: _database(engine, settings, max_relay_lag_seconds, stuck, app), timeout, db_fix),
            _timed(lambda: _broker(settings, hosted, app_reference), timeout, "check COMPENSA_AMQP_URL and that RabbitMQ runs"),
            _timed(
                lambda: _queue_stats(settings, stuck, hosted),
                timeout,
                MANAGEMENT_FIX,
                unavailable="broker queue stats unavailable",
            ),
            _timed(lambda: _redis(settings), timeout, "check COMPENSA_REDIS_URL and that Redis runs"),
        )
    finally:
        if own_engine:
            await engine.dispose()
    checks: dict[str, Any] = {}
    if "database" in db:
        checks["database"] = db["database"]
        checks["database"]["latency_ms"] = db["latency_ms"]
        for name in ("relay", "saga_starts", "deadlines", "circuit_breakers"):
            if name in db:
                checks[name] = db[name]
    else:
        checks["database"] = db
    checks["broker"] = broker
    if queues.get("kind") == "rabbitmq":
        _drop_stale_wedges(queues, broker.get("queues", {}))
    checks["queues"] = queues
    checks["redis"] = redis_
    broker_dlq = {q.name: broker.get("queues", {}).get(q.dlq) for q in hosted.queues}
    for q in hosted.queues:  # the management API also counts what the archive holds unacknowledged
        if (seen := queues.get("dlqs", {}).get(q.dlq)) is not None:
            broker_dlq[q.name] = seen["ready"] + seen["unacked"]
    archived = db.get("archived", {})
    checks["dead_letters"] = {
        "ok": True,
        "queues": {
            q.name: {"waiting_in_dlq": broker_dlq[q.name], "archived_new": archived.get(q.name, 0)} for q in hosted.queues
        },
    }
    warnings = []
    waiting = sum(n for n in broker_dlq.values() if n)
    if waiting:
        warnings.append(f"{waiting} dead letters waiting in broker DLQs: is the archive (`compensa run --service dlq`) running?")
    open_ = sum(archived.values())
    if open_:
        warnings.append(f"{open_} archived dead letters to deal with: `compensa dlq list --status new`")
    starts = checks.get("saga_starts", {})
    if not starts.get("ok", True):
        waiting = {name: queues.get("queues", {}).get(name) for name in SAGA_START_QUEUES}
        waiting = {name: v["ready"] + v["unacked"] for name, v in waiting.items() if v and v["ready"] + v["unacked"]}
        if waiting:  # not lost, perhaps: still queued (a slow or gated saga service)
            starts["queued_starts"] = waiting
            starts["error"] += f"; saga start messages still queued: {waiting}"
            orphans = starts["pending_orders_without_saga"]["count"] + starts["sent_order_created_without_saga"]["count"]
            stats = [queues.get("queues", {}).get(name) or {} for name in waiting]
            moving = all(v.get("consumers") and not v.get("wedged") for v in stats)
            if moving and sum(waiting.values()) >= orphans:
                # Admission control holds them (saga_max_in_flight) and the queue drains:
                # waiting to be started is a queue, not a fault.
                starts["ok"] = True
                warnings.append(
                    f"{sum(waiting.values())} orders waiting to be admitted (saga_max_in_flight): {starts.pop('error')}"
                )
    held = {name: v["unacked"] for name, v in queues.get("dlqs", {}).items() if v["wedged"]}
    if held:
        warnings.append(
            f"dead letters held unacknowledged with no ack for {queues['window_seconds']:g}s: {held}; "
            "the archive (`compensa run --service dlq`) is not committing: can it reach the database?"
        )
    failed = [name for name, check in checks.items() if not check.get("ok", False)]
    if not failed:
        status = "healthy"
    elif all(checks[name].get("unavailable") or checks[name].get("degraded") for name in failed):
        status = "degraded"
    else:
        status = "unhealthy"
    return {
        "ok": status == "healthy",
        "status": status,
        "checked_at": datetime.now(UTC).isoformat(),
        "checks": checks,
        "warnings": warnings,
    }


router = APIRouter()


@router.get("/health", summary="Health of compensa's dependencies (200 healthy, 503 unhealthy)")
async def health(request: Request, settings: Settings = Depends(get_settings)) -> JSONResponse:  # noqa: B008 - FastAPI dependency
    """The `check_health` report; the relay-lag limit and the hosted app come from `app.state`
    (`max_relay_lag_seconds`, `saga_app`)."""
    limit = getattr(request.app.state, "max_relay_lag_seconds", MAX_RELAY_LAG_SECONDS)
    hosted = getattr(request.app.state, "saga_app", ORDER_APP)
    report = await check_health(settings, max_relay_lag_seconds=limit, app=hosted)
    return JSONResponse(report, status_code=200 if report["ok"] else 503)


def health_app(
    settings: Settings | None = None, *, max_relay_lag_seconds: float = MAX_RELAY_LAG_SECONDS, saga_app: SagaApp = ORDER_APP
) -> FastAPI:
    """A standalone app serving only `/health` of `saga_app` (for `compensa health --serve`)."""
    app = FastAPI(title="compensa health", docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(router)
    app.state.max_relay_lag_seconds = max_relay_lag_seconds
    app.state.saga_app = saga_app
    if settings is not None:
        app.dependency_overrides[get_settings] = lambda: settings
    return app
