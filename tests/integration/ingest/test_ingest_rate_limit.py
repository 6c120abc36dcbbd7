"""The per-producer rate limit on real Redis: a sliding window, exact, with no edge burst.

The limiter's clock is driven by the test (`IdempotencyStore(wall=…)`), so windows are
crossed without waiting; the app-level test uses a one-second window and real time,
polling with a deadline.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from producers.ingest.idempotency import IdempotencyStore
from tests.integration.support import outbox_count
from tests.support import eventually, short_event

pytestmark = pytest.mark.integration


class Wall:
    """A clock the test moves (seconds since the epoch)."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def store(redis: Redis, wall: Callable[[], float], window_seconds: float) -> IdempotencyStore:
    return IdempotencyStore(
        redis,
        prefix=f"test:{uuid.uuid4().hex[:8]}:",
        ttl_seconds=60,
        processing_seconds=30,
        window_seconds=window_seconds,
        wall=wall,
    )


async def test_no_burst_of_twice_the_limit_across_a_window_edge(redis):
    """5 per 10 s: 5 just before a fixed window's edge, then nothing just after it, until they age out."""
    wall = Wall(1_700_000_000.0)  # a multiple of 10 s: where a fixed window would start afresh
    limiter = store(redis, wall, window_seconds=10)
    wall.now -= 0.1
    before = [await limiter.admit("erp", 5) for _ in range(5)]
    assert [a.allowed for a in before] == [True] * 5
    assert [a.rate.remaining for a in before] == [4, 3, 2, 1, 0]
    assert all((a.rate.limit, a.rate.window_seconds, a.rate.reset_seconds) == (5, 10, 10) for a in before)

    wall.now += 0.2  # across the edge
    after = [await limiter.admit("erp", 5) for _ in range(5)]
    assert [a.allowed for a in after] == [False] * 5
    assert {(a.rate.remaining, a.retry_after_seconds) for a in after} == {(0, 10)}  # 9.8 s, rounded up

    wall.now += 9.7  # 9.9 s after the five: still inside their window
    assert not (await limiter.admit("erp", 5)).allowed
    wall.now += 0.1  # exactly 10 s after: they have left it
    again = [await limiter.admit("erp", 5) for _ in range(6)]
    assert [a.allowed for a in again] == [True] * 5 + [False]
    # Another producer has a log of its own.
    assert (await limiter.admit("crm", 5)).allowed


async def test_refused_requests_do_not_push_the_limit_further_away(redis):
    wall = Wall()
    limiter = store(redis, wall, window_seconds=60)
    assert [(await limiter.admit("erp", 2)).allowed for _ in range(2)] == [True, True]
    for _ in range(50):  # a client that keeps knocking
        wall.now += 1
        refused = await limiter.admit("erp", 2)
        assert not refused.allowed
    assert refused.retry_after_seconds == 10  # the first two leave the window 60 s after they came
    wall.now += 10
    assert (await limiter.admit("erp", 2)).allowed


async def test_a_lowered_limit_waits_for_enough_requests_to_leave(redis):
    wall = Wall()
    limiter = store(redis, wall, window_seconds=60)
    for second in range(4):
        wall.now = 1_700_000_000.0 + second
        assert (await limiter.admit("erp", 10)).allowed
    wall.now = 1_700_000_010.0
    # Four counted; for one more to fit under two, three must leave: the third came at second 2.
    refused = await limiter.admit("erp", 2)
    assert not refused.allowed and refused.retry_after_seconds == 60 + 2 - 10


@settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    limit=st.integers(min_value=1, max_value=6),
    gaps_ms=st.lists(st.integers(min_value=0, max_value=1_500), min_size=1, max_size=40),
)
async def test_the_limiter_is_an_exact_sliding_window(redis, limit, gaps_ms):
    """Admitted iff fewer than `limit` were admitted in the last window; no window ever holds more."""
    window_ms = 2_000
    wall = Wall()
    limiter = store(redis, wall, window_seconds=window_ms / 1000)
    start_ms = 1_700_000_000_000
    now_ms = start_ms
    admitted: list[int] = []
    for gap in gaps_ms:
        now_ms += gap
        wall.now = now_ms / 1000
        in_window = [t for t in admitted if t > now_ms - window_ms]
        answer = await limiter.admit("erp", limit)
        assert answer.allowed == (len(in_window) < limit), (now_ms - start_ms, in_window)
        if answer.allowed:
            admitted.append(now_ms)
            assert answer.rate.remaining == limit - len(in_window) - 1
        else:
            assert answer.rate.remaining == 0
            leaves_ms = in_window[len(in_window) - limit] + window_ms - now_ms
            assert answer.retry_after_seconds == max(1, -(-leaves_ms // 1000))
    for index, first in enumerate(admitted):
        assert sum(1 for t in admitted[index:] if t < first + window_ms) <= limit


async def test_the_api_answers_429_with_retry_after_and_ratelimit_fields(make_client, add_producer, engine):
    # Five seconds: the four requests fall in one window even on a loaded machine.
    limited = make_client(await add_producer("erp", rate_limit=3), rate_window_seconds=5)
    answers = [await limited.post("/v1/events", json=short_event(f"o-{n}")) for n in range(3)]
    assert [a.status_code for a in answers] == [202, 202, 202]
    fields = [a.headers["RateLimit"].split(";") for a in answers]
    assert [f[:2] for f in fields] == [['"default"', "r=2"], ['"default"', "r=1"], ['"default"', "r=0"]]
    assert all(1 <= int(f[2].removeprefix("t=")) <= 5 for f in fields), fields
    assert {a.headers["RateLimit-Policy"] for a in answers} == {'"default";q=3;w=5'}

    refused = await limited.post("/v1/events", json=short_event("o-3"))
    assert refused.status_code == 429
    assert refused.headers["Content-Type"] == "application/problem+json"
    wait = int(refused.headers["Retry-After"])
    assert 1 <= wait <= 5 and refused.headers["RateLimit"] == f'"default";r=0;t={wait}'
    assert refused.headers["RateLimit-Policy"] == '"default";q=3;w=5'
    problem = refused.json()
    assert (problem["type"], problem["title"], problem["status"], problem["instance"]) == (
        "urn:compensa:problem:rate-limited",
        "Rate limit exceeded",
        429,
        "/v1/events",
    )
    assert "3 requests in any 5 s" in problem["detail"]
    # Answers after the rate check carry the fields too, refusals included.
    other = make_client(await add_producer("crm", ("order.cancelled",), rate_limit=10), rate_window_seconds=60)
    forbidden = await other.post("/v1/events", json=short_event("o-x"))
    assert forbidden.status_code == 403 and forbidden.headers["RateLimit"] == '"default";r=9;t=60'
    # Requests refused before it (here: no key at all) do not.
    assert "RateLimit" not in (await make_client().post("/v1/events", json=short_event())).headers

    async def admitted_again() -> bool:
        return (await limited.post("/v1/events", json=short_event("o-3"))).status_code == 202

    await eventually(admitted_again, timeout=15, interval=0.2, message="not admitted once the window slid past")
    assert await outbox_count(engine) == 4
