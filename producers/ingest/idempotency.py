"""Idempotency-Key records and rate limits in Redis: one atomic script per request.

The first request with a key claims it (one atomic script: set-if-absent with a short
TTL); a retry with the same key and the same request gets the stored response; the
same key with another request is refused; a duplicate arriving while the first still
runs is told to come back. Only successful responses are stored: a refused request
releases its key, so the caller may fix it and retry under the same key.

The rate limit is a sliding window log: a sorted set per producer holds the time of
each request admitted within the last window, so no window of that length, wherever
it starts, holds more than the limit (a fixed window lets twice the limit through
across its edge). Refused requests are not logged: a client that keeps knocking
while limited does not push its own limit further away.

Redis is the fast path, not the guarantee: event ids are derived from (producer, key,
request, index) and the outbox insert ignores ids it already holds, so a request
that committed but died before storing its response is answered with the same ids
when retried (see `message_ids`).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from redis.asyncio import Redis

#: Namespace of the uuid5 event ids derived from idempotency keys.
NAMESPACE = uuid.UUID("6f1d8d52-3c1e-4f5e-9a43-5b0b8e3e6a11")

# Rate limit and claim in one round trip. KEYS[1] = the producer's request log (score:
# admission time in ms), KEYS[2] (optional) = the idempotency record. Both keys carry
# the producer as hash tag, so the script also runs on a Redis Cluster.
# ARGV: now (ms), window (ms), limit, log member (unique), claim marker, marker TTL (ms).
# Returns {admitted, requests counted in the window, ms until the oldest counted one
# leaves it, the record found (or false), its TTL (ms)}.
_ADMIT = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
if count >= limit then
  -- Admitted again once enough have left the window for one more to fit
  -- (more than one if the limit was lowered since they came in).
  local leaving = redis.call('ZRANGE', KEYS[1], count - limit, count - limit, 'WITHSCORES')
  return {0, count, tonumber(leaving[2]) + window - now, false, 0}
end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('PEXPIRE', KEYS[1], window)
count = count + 1
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local frees = tonumber(oldest[2]) + window - now
if #KEYS < 2 then
  return {1, count, frees, false, 0}
end
local current = redis.call('GET', KEYS[2])
if current then
  return {1, count, frees, current, redis.call('PTTL', KEYS[2])}
end
redis.call('SET', KEYS[2], ARGV[5], 'PX', ARGV[6])
return {1, count, frees, false, 0}
"""

_RELEASE = """
local current = redis.call('GET', KEYS[1])
if current and cjson.decode(current)['owner'] == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def fingerprint(method: str, path: str, body: Any) -> str:
    """Hash of a request: method, path and the JSON body in canonical form."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{method} {path}\n{canonical}".encode()).hexdigest()


def message_ids(producer: str, key: str, request_hash: str, count: int) -> list[uuid.UUID]:
    """The event ids of a keyed request: the same request under the same key gets the same ids."""
    return [uuid.uuid5(NAMESPACE, f"{producer}\n{key}\n{request_hash}\n{index}") for index in range(count)]


@dataclass(frozen=True)
class Claim:
    """What the key held: nothing (now claimed), a stored response, a duplicate in flight, or another request."""

    outcome: Literal["claimed", "replay", "in_progress", "mismatch"]
    owner: str = ""
    status: int = 0
    body: Any = None
    retry_after_ms: int = 0


@dataclass(frozen=True)
class RateLimit:
    """Where a producer stands against its limit, for the `RateLimit` header fields."""

    limit: int
    window_seconds: int
    #: Requests the producer may still send now.
    remaining: int
    #: Seconds until the oldest request counted leaves the window (one more may go then).
    reset_seconds: int


@dataclass(frozen=True)
class Admission:
    """The rate-limit verdict and, for a keyed request within the limit, its claim."""

    allowed: bool
    rate: RateLimit
    claim: Claim | None = None

    @property
    def retry_after_seconds(self) -> int:
        return self.rate.reset_seconds


class IdempotencyStore:
    """Per-producer request logs (the rate limit) and Idempotency-Key records in Redis.

    `wall` is the time the log is kept in (every API process shares the log, so their
    clocks should agree; NTP keeps skew far below any window worth configuring).
    Memory: at most `limit` entries per producer, each dropped a window after it came.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str,
        ttl_seconds: float,
        processing_seconds: float,
        window_seconds: float = 60.0,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.ttl_ms = int(ttl_seconds * 1000)
        self.processing_ms = int(processing_seconds * 1000)
        self.window_ms = max(int(window_seconds * 1000), 1)
        self.wall = wall
        self._admit = redis.register_script(_ADMIT)
        self._release = redis.register_script(_RELEASE)

    def _key(self, producer: str, key: str) -> str:
        # Keys are scoped per producer: two producers may pick the same key.
        return f"{self.prefix}{{{producer}}}:idem:{key}"

    def _log(self, producer: str) -> str:
        return f"{self.prefix}{{{producer}}}:rate"

    async def admit(self, producer: str, limit: int, key: str | None = None, request_hash: str = "") -> Admission:
        """Count the request against the producer's limit; within it, claim the key (if any)."""
        owner = uuid.uuid4().hex
        keys = [self._log(producer)]
        if key is not None:
            keys.append(self._key(producer, key))
        marker = json.dumps({"state": "processing", "hash": request_hash, "owner": owner})
        now_ms = int(self.wall() * 1000)
        admitted, count, frees_ms, current, pttl = await self._admit(
            keys=keys, args=[now_ms, self.window_ms, limit, owner, marker, self.processing_ms]
        )
        rate = RateLimit(
            limit=limit,
            window_seconds=math.ceil(self.window_ms / 1000),
            remaining=max(limit - int(count), 0),
            reset_seconds=max(1, math.ceil(max(int(frees_ms), 0) / 1000)),
        )
        if not int(admitted):
            return Admission(False, rate)
        if key is None:
            return Admission(True, rate)
        if current is None:
            return Admission(True, rate, claim=Claim("claimed", owner=owner))
        record = json.loads(current)
        if record["hash"] != request_hash:
            return Admission(True, rate, claim=Claim("mismatch"))
        if record["state"] == "processing":
            return Admission(True, rate, claim=Claim("in_progress", retry_after_ms=max(int(pttl), 0)))
        return Admission(True, rate, claim=Claim("replay", status=record["status"], body=record["body"]))

    async def complete(self, producer: str, key: str, request_hash: str, status: int, body: Any) -> None:
        """Store the response; retries of the same request get it until the TTL runs out."""
        record = json.dumps({"state": "done", "hash": request_hash, "status": status, "body": body})
        await self.redis.set(self._key(producer, key), record, px=self.ttl_ms)

    async def release(self, producer: str, key: str, owner: str) -> None:
        """Drop our `processing` marker (the request was refused or failed before committing)."""
        await self._release(keys=[self._key(producer, key)], args=[owner])
