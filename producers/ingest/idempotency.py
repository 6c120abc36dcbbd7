"""Idempotency-Key records and rate counters in Redis: one atomic script per request.

The first request with a key claims it (one atomic script: set-if-absent with a short
TTL); a retry with the same key and the same request gets the stored response; the
same key with another request is refused; a duplicate arriving while the first still
runs is told to come back. Only successful responses are stored: a refused request
releases its key, so the caller may fix it and retry under the same key.

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

# Rate limit and claim in one round trip. KEYS[1] = this window's request counter,
# KEYS[2] (optional) = the idempotency record. Both keys carry the producer as hash tag,
# so the script also runs on a Redis Cluster.
_ADMIT = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
if count > tonumber(ARGV[2]) then
  return {count, redis.call('PTTL', KEYS[1]), false, 0}
end
if #KEYS < 2 then
  return {count, 0, false, 0}
end
local current = redis.call('GET', KEYS[2])
if current then
  return {count, 0, current, redis.call('PTTL', KEYS[2])}
end
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
return {count, 0, false, 0}
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
class Admission:
    """The rate-limit verdict and, for a keyed request within the limit, its claim."""

    allowed: bool
    retry_after_seconds: int = 0
    claim: Claim | None = None


class IdempotencyStore:
    """Per-producer rate counters and Idempotency-Key records in Redis.

    A fixed rate window lets a burst of up to twice the limit straddle a boundary;
    that is acceptable for a front door whose job is to stop runaway clients, and it
    costs nothing beyond the round trip the idempotency claim makes anyway.
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

    def _counter(self, producer: str) -> str:
        window = int(self.wall() * 1000) // self.window_ms
        return f"{self.prefix}{{{producer}}}:rate:{window}"

    async def admit(self, producer: str, limit: int, key: str | None = None, request_hash: str = "") -> Admission:
        """Count the request against the producer's limit; within it, claim the key (if any)."""
        owner = uuid.uuid4().hex
        keys = [self._counter(producer)]
        if key is not None:
            keys.append(self._key(producer, key))
        marker = json.dumps({"state": "processing", "hash": request_hash, "owner": owner})
        count, rate_pttl, current, pttl = await self._admit(keys=keys, args=[self.window_ms, limit, marker, self.processing_ms])
        if int(count) > limit:
            return Admission(False, retry_after_seconds=max(1, math.ceil(max(int(rate_pttl), 0) / 1000)))
        if key is None:
            return Admission(True)
        if current is None:
            return Admission(True, claim=Claim("claimed", owner=owner))
        record = json.loads(current)
        if record["hash"] != request_hash:
            return Admission(True, claim=Claim("mismatch"))
        if record["state"] == "processing":
            return Admission(True, claim=Claim("in_progress", retry_after_ms=max(int(pttl), 0)))
        return Admission(True, claim=Claim("replay", status=record["status"], body=record["body"]))

    async def complete(self, producer: str, key: str, request_hash: str, status: int, body: Any) -> None:
        """Store the response; retries of the same request get it until the TTL runs out."""
        record = json.dumps({"state": "done", "hash": request_hash, "status": status, "body": body})
        await self.redis.set(self._key(producer, key), record, px=self.ttl_ms)

    async def release(self, producer: str, key: str, owner: str) -> None:
        """Drop our `processing` marker (the request was refused or failed before committing)."""
        await self._release(keys=[self._key(producer, key)], args=[owner])
