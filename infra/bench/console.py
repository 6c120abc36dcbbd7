"""Console benchmark: the operator console's queries on a large saga history, timed.

Seeds a scratch PostgreSQL database (beside the configured one, migrated to head,
dropped at the end) with N sagas and about ten history rows each, in bulk
(`INSERT … SELECT … generate_series`): mostly completed, some cancelled and rejected,
some running (a few of them stuck), compensating and compensation_failed, over several
saga types; dead letters for a fifth of them and an audit row for one in fifty. Then it
calls each query a console page makes, through the same functions the console calls,
and reports the median wall time of several runs (after one warm-up run) in ms.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from sqlalchemy.pool import NullPool

from infra import audit
from infra.console.app import LIVE_STATUSES
from infra.db import create_engine, scratch_database
from infra.dlq.query import (
    DeadLetterFilter,
    count_dead_letters,
    dead_letters_of_saga,
    failure_groups_by_type,
    new_count,
    page_dead_letters,
)
from infra.saga_starts import orders_without_saga
from infra.schema import upgrade
from sagas.queries import get_saga, page_sagas, saga_history, status_counts, stuck_count

#: Rows per console page (the console asks for one more, to know whether a next page exists).
PAGE = 50
#: How long unchanged makes a saga stuck, in the probes (the console's default is health_stuck_seconds, 60 s).
STUCK_FOR = timedelta(minutes=10)

# Status by i % 1000: 90 % completed, 5 % cancelled, 2 % rejected, 1.5 % running (a third of them
# stuck for hours), 0.5 % compensating (two fifths stuck), 1 % compensation_failed.
_SAGAS = """
INSERT INTO saga_instances (saga_id, definition, status, step, data, done_steps, pending_compensations,
    compensation_attempts, reason, version, started_at, updated_at, deadline_at, deadline_kind, deadline_step,
    deadline_attempt)
SELECT
    saga_id, definition, status, CASE WHEN status = 'completed' THEN 3 ELSE 1 END,
    '{"order_id": "' || saga_id || '", "customer_id": "c-' || (i % 5000) || '", "total": 3000}',
    '["reserve_stock"]', CASE WHEN status = 'compensation_failed' THEN '["stock.release"]' ELSE '[]' END,
    CASE WHEN status = 'compensation_failed' THEN 5 ELSE 0 END,
    CASE WHEN status IN ('cancelled', 'rejected', 'compensation_failed') THEN 'payment declined' END,
    :history, started, updated,
    CASE WHEN status IN ('running', 'compensating') THEN updated + interval '5 minutes' END,
    CASE WHEN status IN ('running', 'compensating') THEN 'step' END,
    CASE WHEN status IN ('running', 'compensating') THEN 'charge_payment' END,
    CASE WHEN status IN ('running', 'compensating') THEN 1 END
FROM (
    SELECT i, saga_id, definition, status, started,
        CASE
            WHEN status IN ('running', 'compensating') AND stuck
                THEN CAST(:now AS timestamptz) - interval '2 hours' - (i % 3600) * interval '1 second'
            WHEN status IN ('running', 'compensating') THEN CAST(:now AS timestamptz) - (i % 120) * interval '1 second'
            ELSE started + (5 + i % 60) * interval '1 second'
        END AS updated
    FROM (
        SELECT i,
            'o-' || substr(md5(i::text), 1, 20) AS saga_id,
            CASE WHEN i % 5000 = 0 THEN 'subscription' WHEN i % 20 < 14 THEN 'order' WHEN i % 20 < 19 THEN 'trip'
                 ELSE 'refund' END AS definition,
            CASE WHEN i % 1000 < 900 THEN 'completed' WHEN i % 1000 < 950 THEN 'cancelled'
                 WHEN i % 1000 < 970 THEN 'rejected' WHEN i % 1000 < 985 THEN 'running'
                 WHEN i % 1000 < 990 THEN 'compensating' ELSE 'compensation_failed' END AS status,
            i % 1000 IN (970, 971, 972, 973, 974, 985, 986) AS stuck,
            CAST(:now AS timestamptz) - interval '30 days' + i * CAST(:spread AS float8) * interval '1 second' AS started
        FROM generate_series(1, :sagas) AS i
    ) AS generated
) AS timed
"""

_HISTORY = """
INSERT INTO saga_history (saga_id, version, at, trigger, message_id, causation_id, from_status, to_status, step, note, sent)
SELECT s.saga_id, v, s.started_at + v * interval '500 milliseconds',
    CASE WHEN v = 1 THEN 'order.created' WHEN v = s.version THEN 'stock.committed' ELSE 'stock.reserved' END,
    md5(s.saga_id || v)::uuid::text, md5(s.saga_id || (v - 1))::uuid::text,
    CASE WHEN v = 1 THEN NULL ELSE 'running' END,
    CASE WHEN v = s.version THEN s.status ELSE 'running' END,
    'reserve_stock', '',
    '[{"type": "stock.reserve", "message_id": "' || md5(s.saga_id || v || 'sent')::uuid::text || '"}]'
FROM saga_instances AS s CROSS JOIN generate_series(1, s.version) AS v
"""

_DEAD_LETTERS = """
INSERT INTO dead_letters (dedup_key, queue, dlq, message_id, type, version, saga_id, reason_class, reason, attempts,
    original_exchange, original_routing_key, first_failure_at, last_failure_at, body, headers, archived_at, status,
    replayed_at, purged_at)
SELECT md5(i::text) || md5((i + 1)::text), queue, queue || '.dlq', md5(i::text || 'm')::uuid::text, type, 1,
    'o-' || substr(md5((i * 5)::text), 1, 20), reason_class, reason_class || ': the gateway did not answer', 5,
    'compensa.commands', type, failed - interval '1 minute', failed,
    '{"type": "' || type || '", "payload": {"order_id": "o-' || i || '"}}', '{}', failed,
    CASE WHEN i % 10 = 0 THEN 'new' WHEN i % 10 < 7 THEN 'replayed' ELSE 'purged' END,
    CASE WHEN i % 10 BETWEEN 1 AND 6 THEN failed + interval '1 hour' END,
    CASE WHEN i % 10 >= 7 THEN failed + interval '1 hour' END
FROM (
    SELECT i,
        (ARRAY['payments.commands', 'stock.commands', 'saga.events', 'ledger.events'])[1 + i % 4] AS queue,
        (ARRAY['payment.charge', 'stock.reserve', 'payment.refund'])[1 + i % 3] AS type,
        (ARRAY['transient_exhausted', 'contract', 'handler_error'])[1 + (i / 4) % 3] AS reason_class,
        CAST(:now AS timestamptz) - interval '30 days' + i * CAST(:spread AS float8) * interval '1 second' AS failed
    FROM generate_series(1, :dead_letters) AS i
) AS generated
"""

_AUDIT = """
INSERT INTO audit_log (at, actor, via, action, saga_id, targets, parameters, outcome, detail)
SELECT CAST(:now AS timestamptz) - (i * interval '1 minute'), 'ada', 'console', 'dlq.replay',
    'o-' || substr(md5((i * 50)::text), 1, 20),
    '[' || i || ']', '{}', 'ok', 'replayed 1, skipped 0, refused 0'
FROM generate_series(1, :audits) AS i
"""


async def seed(url: str, sagas: int, history: int, now: datetime) -> dict[str, float]:
    """Fill the database at `url` (migrated, empty); the seconds each table took."""
    engine = create_engine(url)
    spent: dict[str, float] = {}
    try:
        for table, statement, parameters in (
            ("saga_instances", _SAGAS, {"sagas": sagas, "history": history, "spread": 30 * 86_400 / sagas}),
            ("saga_history", _HISTORY, {}),
            ("dead_letters", _DEAD_LETTERS, {"dead_letters": max(sagas // 5, 1), "spread": 30 * 86_400 / max(sagas // 5, 1)}),
            ("audit_log", _AUDIT, {"audits": max(sagas // 50, 1)}),
        ):
            started = time.perf_counter()
            async with engine.begin() as connection:
                await connection.execute(text(statement), {"now": now, **parameters})
            spent[table] = time.perf_counter() - started
    finally:
        await engine.dispose()
    # As autovacuum would have by then: statistics for the planner, a visibility map for index-only scans.
    started = time.perf_counter()
    maintenance = create_async_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        async with maintenance.connect() as connection:
            for table in ("saga_instances", "saga_history", "dead_letters", "audit_log"):
                await connection.execute(text(f"VACUUM ANALYZE {table}"))
    finally:
        await maintenance.dispose()
    spent["vacuum_analyze"] = time.perf_counter() - started
    return spent


Probe = Callable[[AsyncConnection], Awaitable[Any]]


async def _probes(connection: AsyncConnection, now: datetime) -> list[tuple[str, Probe]]:
    """Each query of a console page, as the console makes it (labels say which page and filter)."""
    first_page = await page_sagas(connection, limit=PAGE + 1)
    last = first_page[PAGE - 1]
    some_id = first_page[0]["saga_id"]
    prefix = some_id[:5]
    stuck_since = now - STUCK_FOR
    new_letters = DeadLetterFilter(status="new")
    group = DeadLetterFilter(queue="payments.commands", reason_class="transient_exhausted", type="payment.charge", status="new")
    with_letters = (await connection.execute(text("SELECT saga_id FROM dead_letters ORDER BY id LIMIT 1"))).scalar_one()

    async def live(c: AsyncConnection) -> Any:
        return (
            await status_counts(c, statuses=LIVE_STATUSES),
            await stuck_count(c, now - timedelta(seconds=60)),
            await new_count(c),
        )

    async def saga_page(c: AsyncConnection) -> Any:
        return (
            await get_saga(c, with_letters),
            await saga_history(c, with_letters),
            await dead_letters_of_saga(c, with_letters),
            await audit.list_audit(c, audit.AuditFilter(saga_id=with_letters), limit=200),
        )

    async def group_page(c: AsyncConnection) -> Any:
        return await page_dead_letters(c, group, limit=PAGE + 1), await count_dead_letters(c, group)

    def sagas_where(**filters: Any) -> Probe:
        return lambda c: page_sagas(c, limit=PAGE + 1, **filters)

    return [
        ("saga list: unfiltered, page 1", sagas_where()),
        ("saga list: unfiltered, page 2 (keyset)", sagas_where(after=(last["updated_at"], last["saga_id"]))),
        ("saga list: status completed", sagas_where(status="completed")),
        ("saga list: status running", sagas_where(status="running")),
        ("saga list: status compensation_failed", sagas_where(status="compensation_failed")),
        ("saga list: saga type trip (25 %)", sagas_where(definition="trip")),
        ("saga list: saga type subscription (0.02 %)", sagas_where(definition="subscription")),
        ("saga list: saga type with no sagas", sagas_where(definition="absent")),
        ("saga list: started before 7 days ago", sagas_where(started_before=now - timedelta(days=7))),
        ("saga list: stuck for 10m", sagas_where(unfinished_since=stuck_since)),
        ("saga list: stuck for 10m, status running", sagas_where(status="running", unfinished_since=stuck_since)),
        ("saga list: stuck for 1d (none are)", sagas_where(unfinished_since=now - timedelta(days=1))),
        ("saga list: stuck for 10m, orders without saga", lambda c: orders_without_saga(c, now, STUCK_FOR, PAGE)),
        (f"saga list: id prefix {prefix!r}", sagas_where(id_prefix=prefix)),
        ("saga list: id prefix, whole id", sagas_where(id_prefix=some_id)),
        ("status counts (every saga list page)", status_counts),
        ("stuck count (60 s)", lambda c: stuck_count(c, now - timedelta(seconds=60))),
        ("stuck count (1 d)", lambda c: stuck_count(c, now - timedelta(days=1))),
        ("live counts (every page, /live.json)", live),
        ("saga page: row, history, dead letters, audit", saga_page),
        ("dead-letter groups (status new)", lambda c: failure_groups_by_type(c, new_letters)),
        ("dead-letter group: members page and count", group_page),
    ]


async def time_queries(url: str, now: datetime, runs: int) -> list[dict[str, Any]]:
    """Median, min and max wall ms of each console query over `runs` runs (after one warm-up)."""
    engine = create_engine(url)
    results = []
    try:
        async with engine.connect() as connection:
            for label, probe in await _probes(connection, now):
                await probe(connection)
                timings = []
                for _ in range(runs):
                    started = time.perf_counter()
                    found = await probe(connection)
                    timings.append((time.perf_counter() - started) * 1000)
                rows = len(found) if isinstance(found, list) else None
                results.append(
                    {
                        "query": label,
                        "median_ms": statistics.median(timings),
                        "min_ms": min(timings),
                        "max_ms": max(timings),
                        "rows": rows,
                    }
                )
    finally:
        await engine.dispose()
    return results


async def console_queries(database_url: str, sagas: int, history: int, runs: int) -> dict[str, Any]:
    """Seed a scratch database beside `database_url` and time the console's queries on it."""
    now = datetime.now(UTC)
    async with scratch_database(database_url, "bench_console") as url:
        engine = create_engine(url)
        try:
            await upgrade(engine)
        finally:
            await engine.dispose()
        seeding = await seed(url, sagas, history, now)
        engine = create_engine(url)
        try:
            async with engine.connect() as connection:
                counted = {
                    table: (await connection.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one()  # noqa: S608
                    for table in ("saga_instances", "saga_history", "dead_letters", "audit_log")
                }
        finally:
            await engine.dispose()
        queries = await time_queries(url, now, runs)
    return {"rows": counted, "seed_seconds": seeding, "runs": runs, "queries": queries}
