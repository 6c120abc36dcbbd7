"""Circuit breakers in the database, as `compensa health` sees them, on SQLite and PostgreSQL.

The payments process records its breaker's transitions (infra/circuit_breakers.py);
health, in another process, reads them: an open or half-open breaker of a live process
degrades the report, a row its process stopped refreshing does not.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import delete, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from consumers.payments.breaker import PAYMENT_GATEWAY, BreakerState, CircuitBreaker, CircuitOpenError, Permit, Transition
from infra.circuit_breakers import RETENTION, STALE_AFTER_SECONDS, BreakerRecorder, circuit_breakers, this_process
from infra.clock import SystemClock, VirtualClock
from infra.health import check_health
from infra.settings import Settings
from tests.support import eventually

pytestmark = pytest.mark.integration


@pytest.fixture
async def engine(migrated: AsyncEngine) -> AsyncIterator[AsyncEngine]:
    """The module's migrated database, without breaker rows before and after the test."""
    async with migrated.begin() as connection:
        await connection.execute(delete(circuit_breakers))
    yield migrated
    async with migrated.begin() as connection:
        await connection.execute(delete(circuit_breakers))


def url_of(engine: AsyncEngine) -> str:
    return engine.url.render_as_string(hide_password=False)


def settings_for(engine: AsyncEngine) -> Settings:
    """The database under test; no broker or redis to check (in-memory)."""
    return Settings(database_url=url_of(engine), amqp_url=None, redis_url=None)


async def rows(engine: AsyncEngine) -> list[tuple[str, str, str, int]]:
    async with engine.connect() as connection:
        found = await connection.execute(
            select(circuit_breakers.c.circuit, circuit_breakers.c.holder, circuit_breakers.c.state, circuit_breakers.c.failures)
        )
        return sorted(tuple(row) for row in found)  # type: ignore[misc]


async def test_an_open_breaker_degrades_health_until_it_closes(engine: AsyncEngine) -> None:
    recorder = BreakerRecorder(url_of(engine), SystemClock())
    breaker = CircuitBreaker(PAYMENT_GATEWAY, failures=2, cool_down=timedelta(milliseconds=1), clock=SystemClock())
    breaker.subscribe(recorder)
    settings = settings_for(engine)
    assert (await check_health(settings, engine=engine))["status"] == "healthy"

    for _ in range(2):
        breaker.failed(breaker.acquire(), "gateway timed out")
    assert await eventually(lambda: rows(engine), timeout=10)
    assert await rows(engine) == [(PAYMENT_GATEWAY, this_process(), "open", 2)]

    report = await check_health(settings, engine=engine)
    check = report["checks"]["circuit_breakers"]
    assert (report["status"], report["ok"]) == ("degraded", False)
    assert (check["ok"], check["degraded"]) == (False, True)
    (circuit,) = check["circuits"]
    assert (circuit["circuit"], circuit["holder"], circuit["state"], circuit["failures"]) == (
        PAYMENT_GATEWAY,
        this_process(),
        "open",
        2,
    )
    assert breaker.since is not None and circuit["since"] == breaker.since.isoformat()
    assert "payment_gateway circuit open in " in check["error"] and "gateway timed out" in check["error"]
    assert "delay queues" in check["fix"]

    probe = await eventually(lambda: _probe(breaker), timeout=5)  # once the 1 ms cool-down has passed
    breaker.succeeded(probe)
    await recorder.idle()  # closed and written: the writer has finished

    assert await rows(engine) == [(PAYMENT_GATEWAY, this_process(), "closed", 0)]
    report = await check_health(settings, engine=engine)
    assert report["status"] == "healthy"
    assert report["checks"]["circuit_breakers"]["ok"] is True
    assert [c["state"] for c in report["checks"]["circuit_breakers"]["circuits"]] == ["closed"]


def _probe(breaker: CircuitBreaker) -> Permit | None:
    try:
        return breaker.acquire()
    except CircuitOpenError:  # still cooling down: not yet
        return None


async def test_an_open_breaker_refreshes_its_row_while_it_stays_open(engine: AsyncEngine) -> None:
    recorder = BreakerRecorder(url_of(engine), SystemClock(), refresh_seconds=0.05)
    opened = Transition(PAYMENT_GATEWAY, BreakerState.CLOSED, BreakerState.OPEN, "5 in a row", datetime.now(UTC), 5)
    recorder(opened)

    async def updated() -> datetime | None:
        async with engine.connect() as connection:
            return (await connection.execute(select(circuit_breakers.c.updated_at))).scalar_one_or_none()

    first = await eventually(updated, timeout=10)
    later = await eventually(lambda: _after(updated, first), timeout=10)
    assert later > first and recorder.writes >= 2

    recorder(Transition(PAYMENT_GATEWAY, BreakerState.OPEN, BreakerState.HALF_OPEN, "cool-down", datetime.now(UTC), 5))
    recorder(Transition(PAYMENT_GATEWAY, BreakerState.HALF_OPEN, BreakerState.CLOSED, "probe succeeded", datetime.now(UTC), 0))
    await recorder.idle()
    assert await rows(engine) == [(PAYMENT_GATEWAY, this_process(), "closed", 0)]


async def _after(updated, first: datetime) -> datetime | None:  # type: ignore[no-untyped-def]
    now = await updated()
    return now if now is not None and now > first else None


async def test_rows_of_stopped_processes_are_listed_but_do_not_degrade(engine: AsyncEngine) -> None:
    now = datetime.now(UTC)
    stale = now - timedelta(seconds=STALE_AFTER_SECONDS + 5)
    async with engine.begin() as connection:
        await connection.execute(
            insert(circuit_breakers),
            [
                {
                    "circuit": PAYMENT_GATEWAY,
                    "holder": "gone-host:41",
                    "state": "open",
                    "since": stale,
                    "failures": 5,
                    "reason": "5 transient failures in a row",
                    "updated_at": stale,
                },
                {
                    "circuit": PAYMENT_GATEWAY,
                    "holder": "live-host:42",
                    "state": "closed",
                    "since": now,
                    "failures": 0,
                    "reason": "probe succeeded",
                    "updated_at": now,
                },
            ],
        )

    report = await check_health(settings_for(engine), engine=engine)
    check = report["checks"]["circuit_breakers"]

    assert report["status"] == "healthy" and check["ok"] is True
    assert [c["holder"] for c in check["circuits"]] == ["live-host:42"]
    assert [(c["holder"], c["state"]) for c in check["stale"]] == [("gone-host:41", "open")]


async def test_a_write_prunes_rows_not_written_for_the_retention_period(engine: AsyncEngine) -> None:
    clock = VirtualClock(datetime.now(UTC))
    long_ago = clock.now() - RETENTION - timedelta(minutes=1)
    recently = clock.now() - RETENTION + timedelta(minutes=1)
    async with engine.begin() as connection:
        for holder, at in (("old:1", long_ago), ("recent:2", recently)):
            await connection.execute(
                insert(circuit_breakers).values(
                    circuit=PAYMENT_GATEWAY, holder=holder, state="open", since=at, failures=5, reason="r", updated_at=at
                )
            )
    recorder = BreakerRecorder(url_of(engine), clock, holder="this:3")

    recorder(Transition(PAYMENT_GATEWAY, BreakerState.HALF_OPEN, BreakerState.CLOSED, "probe succeeded", clock.now(), 0))
    await recorder.idle()

    assert [(holder, state) for _, holder, state, _ in await rows(engine)] == [("recent:2", "open"), ("this:3", "closed")]
