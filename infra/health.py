"""Health: database, broker, redis (when configured), relay lag, dead letters.

`check_health(settings)` runs every check at once, each bounded by a timeout, and
returns a JSON-able report whose `ok` is false when a dependency is unreachable,
the schema is behind, the topology is missing or the relay lags too far behind.
Dead letters never make the service unhealthy (they are the operator's work, not
an outage); they are counted and reported as warnings.

`router` serves it as `GET /health` (200 healthy, 503 unhealthy) for container
checks; `health_app()` is a standalone app for `compensa health --serve`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from alembic.script import ScriptDirectory
from infra import topology as t
from infra.dlq.query import open_counts
from infra.schema import alembic_config
from infra.services import OUTBOX_SERVICES
from infra.settings import Settings, get_settings
from outbox.uow import pending_summary

#: Default: a pending outbox row older than this means the relay is not keeping up.
MAX_RELAY_LAG_SECONDS = 60.0
CHECK_TIMEOUT_SECONDS = 5.0


def _safe(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown without its credentials
        return url.split("@")[-1]


def _error(exc: BaseException) -> str:
    text_ = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text_}" if text_ else type(exc).__name__


async def _timed(check: Callable[[], Awaitable[dict[str, Any]]], timeout: float, fix: str) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        result = await asyncio.wait_for(check(), timeout)
    except TimeoutError:
        result = {"ok": False, "error": f"no answer within {timeout:.0f}s", "fix": fix}
    except Exception as exc:  # noqa: BLE001 - a failing check is reported, not raised
        result = {"ok": False, "error": _error(exc), "fix": fix}
    result["latency_ms"] = round((time.perf_counter() - started) * 1000, 1)
    return result


async def _database(engine: AsyncEngine, settings: Settings, max_relay_lag: float) -> dict[str, Any]:
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
    outboxes = [await pending_summary(engine, name, now) for name in OUTBOX_SERVICES]
    lag = max((o["oldest_pending_age_seconds"] for o in outboxes), default=0.0)
    relay = {
        "ok": lag <= max_relay_lag,
        "max_lag_seconds": round(lag, 3),
        "limit_seconds": max_relay_lag,
        "pending": sum(o["pending"] for o in outboxes),
        "outboxes": {o["service"]: {"pending": o["pending"], "oldest_pending_age_seconds": round(o["oldest_pending_age_seconds"], 3)} for o in outboxes},
    }
    if not relay["ok"]:
        relay["error"] = f"oldest pending outbox row is {lag:.0f}s old (limit {max_relay_lag:.0f}s)"
        relay["fix"] = "start or scale `compensa relay` (or `compensa run`), and check the broker"
    async with engine.connect() as connection:
        archived = await open_counts(connection)
    return {"database": database, "relay": relay, "archived": archived}


def _current_revision(sync_connection: Any) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(sync_connection).get_current_revision()


async def _broker(settings: Settings) -> dict[str, Any]:
    if not settings.amqp_url:
        return {"ok": True, "kind": "in-memory", "note": "COMPENSA_AMQP_URL unset: in-process broker, nothing to check"}
    import aio_pika

    # aiormq logs a failed connect at ERROR; the report already says it.
    logging.getLogger("aiormq.connection").setLevel(logging.CRITICAL)
    connection = await aio_pika.connect(settings.amqp_url, timeout=CHECK_TIMEOUT_SECONDS)
    try:
        missing, depths = [], {}
        for queue in t.WORK_QUEUES:
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
        result["fix"] = "run `compensa topology declare`"
    return result


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
    timeout: float = CHECK_TIMEOUT_SECONDS,
) -> dict[str, Any]:
    """Check every dependency at once; return the report (`ok` false when unhealthy)."""
    from infra.db import create_engine

    own_engine = engine is None
    engine = engine or create_engine(settings.database_url)
    try:
        db_fix = "check COMPENSA_DATABASE_URL and that the database server runs"
        db, broker, redis_ = await asyncio.gather(
            _timed(lambda: _database(engine, settings, max_relay_lag_seconds), timeout, db_fix),
            _timed(lambda: _broker(settings), timeout, "check COMPENSA_AMQP_URL and that RabbitMQ runs"),
            _timed(lambda: _redis(settings), timeout, "check COMPENSA_REDIS_URL and that Redis runs"),
        )
    finally:
        if own_engine:
            await engine.dispose()
    checks: dict[str, Any] = {}
    if "database" in db:
        checks["database"] = db["database"]
        checks["database"]["latency_ms"] = db["latency_ms"]
        if "relay" in db:
            checks["relay"] = db["relay"]
    else:
        checks["database"] = db
    checks["broker"] = broker
    checks["redis"] = redis_
    broker_dlq = {q.name: broker.get("queues", {}).get(q.dlq) for q in t.WORK_QUEUES}
    archived = db.get("archived", {})
    checks["dead_letters"] = {
        "ok": True,
        "queues": {
            q.name: {"waiting_in_dlq": broker_dlq[q.name], "archived_new": archived.get(q.name, 0)}
            for q in t.WORK_QUEUES
        },
    }
    warnings = []
    waiting = sum(n for n in broker_dlq.values() if n)
    if waiting:
        warnings.append(f"{waiting} dead letters waiting in broker DLQs: is the archive (`compensa run --service dlq`) running?")
    open_ = sum(archived.values())
    if open_:
        warnings.append(f"{open_} archived dead letters to deal with: `compensa dlq list --status new`")
    ok = all(check.get("ok", False) for check in checks.values())
    return {"ok": ok, "status": "healthy" if ok else "unhealthy", "checked_at": datetime.now(UTC).isoformat(), "checks": checks, "warnings": warnings}


router = APIRouter()


@router.get("/health", summary="Health of compensa's dependencies (200 healthy, 503 unhealthy)")
async def health(request: Request, settings: Settings = Depends(get_settings)) -> JSONResponse:  # noqa: B008 - FastAPI dependency
    """The `check_health` report; the relay-lag limit comes from `app.state.max_relay_lag_seconds`."""
    limit = getattr(request.app.state, "max_relay_lag_seconds", MAX_RELAY_LAG_SECONDS)
    report = await check_health(settings, max_relay_lag_seconds=limit)
    return JSONResponse(report, status_code=200 if report["ok"] else 503)


def health_app(settings: Settings | None = None, *, max_relay_lag_seconds: float = MAX_RELAY_LAG_SECONDS) -> FastAPI:
    """A standalone app serving only `/health` (for `compensa health --serve`)."""
    app = FastAPI(title="compensa health", docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(router)
    app.state.max_relay_lag_seconds = max_relay_lag_seconds
    if settings is not None:
        app.dependency_overrides[get_settings] = lambda: settings
    return app
