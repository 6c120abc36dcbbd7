"""HTTP client for `compensa api`: retries with backoff, one idempotency key per send.

The key is chosen once per `publish` call (or given by the caller) and the body is
serialised once, so every retry of that call is the same request under the same key:
the server accepts it at most once, whether the first attempt's response was lost,
timed out or never came back. 4xx answers are not retried (except 409 and 429,
which say "later"): they raise a specific `Rejected` error.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx

from contracts import CompensaError, Payload, TransientError

RETRY_STATUSES = frozenset({409, 429, 500, 502, 503, 504})


class IngestError(CompensaError):
    """Base of the SDK's HTTP errors."""


class Rejected(IngestError):
    """The server refused the request; retrying the same request cannot help."""

    def __init__(self, status: int, detail: Any) -> None:
        self.status = status
        self.detail = detail
        super().__init__(f"{status}: {_describe(detail)}")

    @property
    def errors(self) -> list[dict[str, Any]]:
        return self.detail if isinstance(self.detail, list) else []


class AuthenticationFailed(Rejected):
    """401: the API key is missing, unknown or revoked."""


class PermissionDenied(Rejected):
    """403: this producer may not publish that event type."""


class RequestTooLarge(Rejected):
    """413: the body is over the server's size limit; send a smaller batch."""


class InvalidEvent(Rejected):
    """422: the event does not match its contract; `errors` names each field."""


class IdempotencyKeyReused(Rejected):
    """422: this idempotency key was already used for a different request."""


class IngestUnavailable(IngestError, TransientError):
    """The server could not be reached or kept answering 409/429/5xx; nothing is known to be accepted."""


def _describe(detail: Any) -> str:
    if isinstance(detail, list):
        return "; ".join(
            f"{'.'.join(str(p) for p in item.get('loc', []))}: {item.get('msg')}" if isinstance(item, dict) else str(item)
            for item in detail
        )
    return str(detail)


def _rejection(response: httpx.Response) -> Rejected:
    """The error for a refusal: an RFC 9457 problem's field `errors`, else its `detail`."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        errors = body.get("errors")
        detail: Any = errors if isinstance(errors, list) and errors else body.get("detail", response.text)
        problem_type = body.get("type")
    else:
        detail, problem_type = response.text, None
    status = response.status_code
    if status == 401:
        return AuthenticationFailed(status, detail)
    if status == 403:
        return PermissionDenied(status, detail)
    if status == 413:
        return RequestTooLarge(status, detail)
    if status == 422:
        if problem_type == "urn:compensa:problem:idempotency-key-reused":
            return IdempotencyKeyReused(status, detail)
        return InvalidEvent(status, detail)
    return Rejected(status, detail)


@dataclass(frozen=True)
class Accepted:
    """The server committed the events; they will be published."""

    message_ids: tuple[uuid.UUID, ...]
    idempotency_key: str
    replayed: bool
    attempts: int

    @property
    def message_id(self) -> uuid.UUID:
        return self.message_ids[0]


def event(
    payload: Payload | Mapping[str, Any],
    *,
    correlation_id: str,
    type: str | None = None,  # noqa: A002 - mirrors the envelope's field
    version: int | None = None,
    message_id: uuid.UUID | None = None,
    occurred_at: datetime | None = None,
    causation_id: uuid.UUID | None = None,
) -> dict[str, Any]:
    """The JSON of one event in the short form the API takes."""
    if isinstance(payload, Payload):
        body: dict[str, Any] = {
            "type": payload.message_type,
            "version": payload.message_version,
            "payload": payload.model_dump(mode="json"),
        }
    else:
        if type is None:
            raise ValueError("a payload given as a mapping needs type= (e.g. type='order.created')")
        body = {"type": type, "payload": dict(payload)}
        if version is not None:
            body["version"] = version
    body["correlation_id"] = correlation_id
    if message_id is not None:
        body["message_id"] = str(message_id)
    if occurred_at is not None:
        body["occurred_at"] = occurred_at.isoformat()
    if causation_id is not None:
        body["causation_id"] = str(causation_id)
    return body


@dataclass(frozen=True)
class _Request:
    path: str
    content: bytes
    headers: dict[str, str]
    key: str


class _Policy:
    def __init__(self, max_attempts: int, backoff_base: float, backoff_max: float, rng: random.Random | None) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.rng = rng or random.Random()

    def delay(self, attempt: int, response: httpx.Response | None) -> float:
        """Exponential backoff with full jitter, never sooner than the server's Retry-After."""
        delay = self.rng.uniform(0, min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1)))
        if response is not None:
            retry_after = response.headers.get("Retry-After", "")
            if retry_after.isdigit():
                delay = max(delay, min(float(retry_after), self.backoff_max))
        return delay

    def request(self, path: str, body: Any, key: str | None, api_key: str) -> _Request:
        key = key or uuid.uuid4().hex
        return _Request(
            path,
            json.dumps(body, separators=(",", ":")).encode(),
            {"Content-Type": "application/json", "Idempotency-Key": key, "X-API-Key": api_key},
            key,
        )

    def outcome(self, request: _Request, response: httpx.Response, attempt: int) -> Accepted | None:
        """Accepted on 2xx, None to retry, raise Rejected on a final 4xx."""
        if response.is_success:
            body = response.json()
            return Accepted(
                tuple(uuid.UUID(m) for m in body["message_ids"]),
                request.key,
                response.headers.get("Idempotent-Replayed") == "true",
                attempt,
            )
        if response.status_code in RETRY_STATUSES:
            return None
        raise _rejection(response)

    def give_up(self, request: _Request, last: str) -> IngestUnavailable:
        return IngestUnavailable(
            f"gave up after {self.max_attempts} attempts (last: {last}); idempotency key {request.key} "
            "may be retried later without risk of a duplicate"
        )


def _last(response: httpx.Response | None, error: Exception | None) -> str:
    if error is not None:
        return f"{type(error).__name__}: {error}"
    assert response is not None
    return f"HTTP {response.status_code}"


class AsyncIngestClient:
    """``async with AsyncIngestClient(url, api_key) as client: await client.publish(...)``."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        max_attempts: int = 6,
        backoff_base: float = 0.1,
        backoff_max: float = 5.0,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._api_key = api_key
        self._policy = _Policy(max_attempts, backoff_base, backoff_max, rng)
        self._sleep = sleep
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout, transport=transport)

    async def __aenter__(self) -> AsyncIngestClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def publish(
        self,
        payload: Payload | Mapping[str, Any],
        *,
        correlation_id: str,
        type: str | None = None,  # noqa: A002
        version: int | None = None,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> Accepted:
        """Send one event; return once the server committed it (or raise)."""
        body = event(payload, correlation_id=correlation_id, type=type, version=version, **fields)
        return await self._send(self._policy.request("/v1/events", body, idempotency_key, self._api_key))

    async def publish_batch(self, events: Sequence[Mapping[str, Any]], *, idempotency_key: str | None = None) -> Accepted:
        """Send several events (built with `event(...)`); all are accepted or none."""
        body = {"events": [dict(e) for e in events]}
        return await self._send(self._policy.request("/v1/events:batch", body, idempotency_key, self._api_key))

    async def _send(self, request: _Request) -> Accepted:
        response: httpx.Response | None = None
        for attempt in range(1, self._policy.max_attempts + 1):
            error: Exception | None = None
            try:
                response = await self._http.post(request.path, content=request.content, headers=request.headers)
            except httpx.TransportError as exc:  # connect, read, write, timeout: the answer may be lost
                error, response = exc, None
            else:
                accepted = self._policy.outcome(request, response, attempt)
                if accepted is not None:
                    return accepted
            if attempt == self._policy.max_attempts:
                raise self._policy.give_up(request, _last(response, error))
            await self._sleep(self._policy.delay(attempt, response))
        raise AssertionError("unreachable")


class IngestClient:
    """The blocking twin of `AsyncIngestClient`, for code without an event loop."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        max_attempts: int = 6,
        backoff_base: float = 0.1,
        backoff_max: float = 5.0,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._api_key = api_key
        self._policy = _Policy(max_attempts, backoff_base, backoff_max, rng)
        self._sleep = sleep
        self._http = httpx.Client(base_url=base_url, timeout=timeout, transport=transport)

    def __enter__(self) -> IngestClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def publish(
        self,
        payload: Payload | Mapping[str, Any],
        *,
        correlation_id: str,
        type: str | None = None,  # noqa: A002
        version: int | None = None,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> Accepted:
        body = event(payload, correlation_id=correlation_id, type=type, version=version, **fields)
        return self._send(self._policy.request("/v1/events", body, idempotency_key, self._api_key))

    def publish_batch(self, events: Sequence[Mapping[str, Any]], *, idempotency_key: str | None = None) -> Accepted:
        body = {"events": [dict(e) for e in events]}
        return self._send(self._policy.request("/v1/events:batch", body, idempotency_key, self._api_key))

    def _send(self, request: _Request) -> Accepted:
        response: httpx.Response | None = None
        for attempt in range(1, self._policy.max_attempts + 1):
            error: Exception | None = None
            try:
                response = self._http.post(request.path, content=request.content, headers=request.headers)
            except httpx.TransportError as exc:
                error, response = exc, None
            else:
                accepted = self._policy.outcome(request, response, attempt)
                if accepted is not None:
                    return accepted
            if attempt == self._policy.max_attempts:
                raise self._policy.give_up(request, _last(response, error))
            self._sleep(self._policy.delay(attempt, response))
        raise AssertionError("unreachable")
