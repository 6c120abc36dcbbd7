"""The HTTP front door: POST events, get 202 once they are committed to the ingest outbox.

Every request goes: API key (401) → Content-Type (415) → Idempotency-Key present if
required (400) → size (413) → JSON (422) → rate limit (429) → Idempotency-Key
(replay / 409 / 422) → contracts and permissions (422 / 403) → one saga per business
key (409) → one transaction into the outbox → 202 with the message ids. Redis down
means 503: without it neither the key nor the limit can be checked, and guessing
risks a duplicate. Hostile input is a 4xx, never a 5xx: the body is parsed by
`submission.parse_json`, and a request the database refuses fails alone (422).

Every error is an RFC 9457 problem (`problems.py`); every answer after the rate check
carries the `RateLimit` and `RateLimit-Policy` fields. GET /livez says the process
answers, GET /readyz (and its alias /health) that events can be accepted now
(database and Redis; status only, cached for a second); the operators' full report
is `compensa health`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

import structlog
from fastapi import FastAPI, Header, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from contracts.clock import Clock
from contracts.export import json_schemas
from outbox.tables import tables_for
from outbox.tracing import current_traceparent
from outbox.uow import outbox_row
from producers.ingest.auth import Producer, ProducerDirectory
from producers.ingest.business_keys import duplicate_starts, taken_keys
from producers.ingest.config import IngestConfig
from producers.ingest.idempotency import Claim, IdempotencyStore, RateLimit, fingerprint, message_ids
from producers.ingest.problems import MEDIA_TYPE as PROBLEM_MEDIA_TYPE
from producers.ingest.problems import Problem, problem, summary
from producers.ingest.submission import (
    Accepted,
    Health,
    SubmissionRejected,
    build_messages,
    field_error,
    json_media_type,
    openapi_components,
    parse_events,
    parse_json,
)
from producers.ingest.writer import OutboxWriter, RowsRefused

log = structlog.get_logger("compensa.ingest")

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The producer's API key.")
_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <API key>`.")

#: The name of the one rate-limit policy, in `RateLimit` and `RateLimit-Policy`.
RATE_POLICY = "default"

_HEADER_DOCS: dict[str, dict[str, Any]] = {
    "Retry-After": {
        "description": "Seconds to wait before sending the request again.",
        "schema": {"type": "integer", "minimum": 0},
    },
    "RateLimit": {
        "description": (
            "draft-ietf-httpapi-ratelimit-headers: `r` requests this producer may still send now; `t` seconds "
            "until the oldest request counted leaves the window (one more may go then). Sent with every answer "
            "after the rate check."
        ),
        "schema": {
            "type": "string",
            "pattern": f'^"{RATE_POLICY}";r=[0-9]+;t=[0-9]+$',
            "examples": [f'"{RATE_POLICY}";r=597;t=60'],
        },
    },
    "RateLimit-Policy": {
        "description": (
            "The producer's quota: `q` requests in any `w` seconds (a sliding window: no interval of `w` seconds "
            "holds more than `q`). Sent with every answer after the rate check."
        ),
        "schema": {
            "type": "string",
            "pattern": f'^"{RATE_POLICY}";q=[0-9]+;w=[0-9]+$',
            "examples": [f'"{RATE_POLICY}";q=600;w=60'],
        },
    },
    "WWW-Authenticate": {"description": "How to authenticate: `Bearer`.", "schema": {"type": "string", "const": "Bearer"}},
    "Idempotent-Replayed": {
        "description": "`true` when this is the stored answer to an earlier request with the same Idempotency-Key.",
        "schema": {"type": "string", "const": "true"},
    },
}

#: Status → (description, headers it carries: name → always sent).
_REFUSALS: dict[int, tuple[str, dict[str, bool]]] = {
    400: (
        "`urn:compensa:problem:idempotency-key-missing`: this server requires an Idempotency-Key header; or "
        "`urn:compensa:problem:client-disconnected`: the client left before the body was complete (nobody reads this).",
        {},
    ),
    401: ("Missing, unknown or revoked API key.", {"WWW-Authenticate": True}),
    403: (
        "`urn:compensa:problem:forbidden-event-type`: the key's producer may not publish this event type.",
        {"RateLimit": True, "RateLimit-Policy": True},
    ),
    408: ("The body was not received within the body timeout (a slow sender).", {}),
    409: (
        "`urn:compensa:problem:request-in-progress`: a request with this Idempotency-Key is still being processed "
        "(retry after Retry-After); or `urn:compensa:problem:already-started`: an order.created names an order "
        "that already has a saga (one saga per business key).",
        {"Retry-After": False, "RateLimit": True, "RateLimit-Policy": True},
    ),
    413: ("Body larger than the request size limit.", {}),
    415: ("Content-Type is not `application/json` (UTF-8).", {}),
    422: (
        "`urn:compensa:problem:invalid-request`, each field error under `errors`: not UTF-8 JSON, nested deeper "
        "than the limit, an integer past 64 bits, NaN, a lone surrogate or NUL in a string, a control character "
        "in an identifier, a contract violation, a rule across fields (see the body's description), an invalid "
        "header; or `urn:compensa:problem:idempotency-key-reused`: the Idempotency-Key was used for another request.",
        {"RateLimit": False, "RateLimit-Policy": False},
    ),
    429: (
        "`urn:compensa:problem:rate-limited`: the producer's rate limit is reached; retry after Retry-After.",
        {"Retry-After": True, "RateLimit": True, "RateLimit-Policy": True},
    ),
    500: ("An unexpected error; the event may or may not have been accepted: retry with the same Idempotency-Key.", {}),
    503: (
        "`urn:compensa:problem:unavailable`: Redis or the database is unavailable; nothing was accepted. "
        "Retry after Retry-After.",
        {"Retry-After": True, "RateLimit": False, "RateLimit-Policy": False},
    ),
}


def _problem_doc(description: str, headers: dict[str, bool] | None = None) -> dict[str, Any]:
    """An error answer in the OpenAPI document: a `Problem` as problem+json, with its headers."""
    doc: dict[str, Any] = {
        "description": description,
        "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }
    if headers:
        doc["headers"] = {name: {**_HEADER_DOCS[name], "required": always} for name, always in headers.items()}
    return doc


def _rate_headers_doc() -> dict[str, Any]:
    return {name: {**_HEADER_DOCS[name], "required": True} for name in ("RateLimit", "RateLimit-Policy")}


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: _problem_doc(description, headers) for status, (description, headers) in _REFUSALS.items()
}
_UNEXPECTED: dict[int | str, dict[str, Any]] = {500: _problem_doc(_REFUSALS[500][0])}


# Module level: FastAPI resolves these (string) annotations in the module's namespace.
ApiKey = Annotated[str | None, Security(_api_key_header)]
Bearer = Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description="Unique per logical request; a retry with the same key and body returns the first response.",
    ),
]
TraceParent = Annotated[str | None, Header(alias="traceparent", description="W3C trace context, copied into the envelope.")]


_READINESS_TIMEOUT_SECONDS = 2.0


class _UtcClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


class Refused(Exception):
    """A refusal, answered as a problem: `name` picks its type (`problems.PROBLEM_TYPES`)."""

    def __init__(
        self,
        status: int,
        detail: str,
        headers: dict[str, str] | None = None,
        *,
        name: str | None = None,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}
        self.name = name
        self.errors = errors

    @classmethod
    def invalid(cls, errors: list[dict[str, Any]], *, name: str = "invalid-request") -> Refused:
        return cls(422, summary(errors), name=name, errors=errors)

    @classmethod
    def rejected(cls, rejected: SubmissionRejected) -> Refused:
        if isinstance(rejected.detail, list):
            return cls.invalid(rejected.detail)
        return cls(rejected.status, str(rejected.detail), name="forbidden-event-type" if rejected.status == 403 else None)

    def response(self, path: str) -> Response:
        return problem(self.status, self.detail, path=path, name=self.name, errors=self.errors, headers=self.headers)


def rate_headers(rate: RateLimit) -> dict[str, str]:
    """The `RateLimit` and `RateLimit-Policy` fields (draft-ietf-httpapi-ratelimit-headers)."""
    return {
        "RateLimit": f'"{RATE_POLICY}";r={rate.remaining};t={rate.reset_seconds}',
        "RateLimit-Policy": f'"{RATE_POLICY}";q={rate.limit};w={rate.window_seconds}',
    }


async def _read_body(request: Request, limit: int, timeout_seconds: float) -> bytes:
    declared = request.headers.get("content-length")
    too_large = Refused(413, f"request body larger than {limit} bytes")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_seconds):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
    except TimeoutError:
        # A slow sender would hold the connection (and a worker's memory) for as long as it likes.
        log.info("ingest.body_timeout", path=request.url.path, received_bytes=size)
        raise Refused(408, f"request body not received within {timeout_seconds:g}s") from None
    except ClientDisconnect:
        # Routine on the internet: one line, not a traceback. Nobody reads the answer.
        log.info("ingest.client_disconnected", path=request.url.path, received_bytes=size)
        raise Refused(400, "client disconnected before the body was complete", name="client-disconnected") from None
    return b"".join(chunks)


class Ingest:
    """The request pipeline, independent of routing."""

    def __init__(
        self,
        engine: AsyncEngine,
        redis: Redis,
        producers: ProducerDirectory,
        config: IngestConfig,
        clock: Clock,
    ) -> None:
        self.engine = engine
        self.redis = redis
        self.producers = producers
        self.config = config
        self.clock = clock
        self.writer = OutboxWriter(engine, tables_for(config.outbox).outbox)
        #: (valid until, on monotonic time; ready) of the last readiness check, and the one running.
        self._readiness: tuple[float, bool] | None = None
        self._readiness_check: asyncio.Task[bool] | None = None
        self.idempotency = IdempotencyStore(
            redis,
            prefix=config.redis_prefix,
            ttl_seconds=config.idempotency_ttl_seconds,
            processing_seconds=config.processing_ttl_seconds,
            window_seconds=config.rate_window_seconds,
        )

    async def authenticate(self, api_key: str | None, bearer: HTTPAuthorizationCredentials | None) -> Producer:
        presented = api_key or (bearer.credentials if bearer is not None else None)
        try:
            producer = await self.producers.authenticate(presented)
        except (SQLAlchemyError, OSError) as exc:
            raise Refused(503, f"database unavailable: {type(exc).__name__}", {"Retry-After": "5"}, name="unavailable") from None
        if producer is None:
            raise Refused(
                401,
                "missing, unknown or revoked API key" if presented else "missing API key (X-API-Key or Authorization: Bearer)",
                {"WWW-Authenticate": "Bearer"},
            )
        return producer

    async def handle(
        self, request: Request, *, batch: bool, producer: Producer, key: str | None, traceparent: str | None
    ) -> JSONResponse:
        if not json_media_type(request.headers.get("content-type")):
            raise Refused(415, "Content-Type must be application/json (UTF-8)")
        if key is None and self.config.require_idempotency_key:
            # 400, as draft-ietf-httpapi-idempotency-key-header says (see docs/architecture.md).
            raise Refused(400, "this server requires an Idempotency-Key header", name="idempotency-key-missing")
        raw = await _read_body(request, self.config.max_request_bytes, self.config.body_timeout_seconds)
        try:
            # Everything a field cannot hold is refused here, per request, before the
            # shared commit: no request can fail its neighbours' INSERT.
            body = parse_json(raw, max_depth=self.config.max_json_depth)
        except SubmissionRejected as rejected:
            raise Refused.rejected(rejected) from None
        request_hash = fingerprint(request.method, request.url.path, body)
        claim, rate = await self._admit(producer, key, request_hash)
        try:
            return await self._accept(request, body, batch, producer, key, traceparent, claim, request_hash, rate)
        except Refused as refused:
            refused.headers = {**rate, **refused.headers}
            raise

    async def _accept(
        self,
        request: Request,
        body: Any,
        batch: bool,
        producer: Producer,
        key: str | None,
        traceparent: str | None,
        claim: Claim | None,
        request_hash: str,
        rate: dict[str, str],
    ) -> JSONResponse:
        """Everything after the rate check: validate, write, answer (every answer carries `rate`)."""
        if claim is not None and claim.outcome == "replay":
            return JSONResponse(claim.body, status_code=claim.status, headers={**rate, "Idempotent-Replayed": "true"})
        committed = False
        try:
            events = parse_events(body, batch=batch, max_events=self.config.max_batch_events)
            if key is not None:
                derived = message_ids(producer.name, key, request_hash, len(events))
                ids: Callable[[int], uuid.UUID] = derived.__getitem__
            else:
                ids = lambda _index: uuid.uuid4()  # noqa: E731
            now = self.clock.now()
            # The request's span (infra's middleware) when there is one, else the caller's header.
            traceparent = current_traceparent() or traceparent
            messages = build_messages(events, batch=batch, producer=producer, now=now, ids=ids, traceparent=traceparent)
            await self._refuse_second_starts(messages)
            await self._write(messages, now)
            committed = True
        except SubmissionRejected as rejected:
            raise Refused.rejected(rejected) from None
        finally:
            if key is not None and claim is not None and not committed:
                await self._release(producer, key, claim.owner)
        accepted_ids = [str(m.message_id) for m in messages]
        response: dict[str, Any] = {"message_ids": accepted_ids}
        if not batch:
            response["message_id"] = accepted_ids[0]
        log.info("ingest.accepted", producer=producer.name, count=len(messages), message_ids=accepted_ids)
        if key is not None:
            try:
                await self.idempotency.complete(producer.name, key, request_hash, 202, response)
            except (RedisError, OSError) as exc:
                # Committed already: answer 202. A retry finds the marker until it
                # expires (409), then re-runs and meets the same ids in the outbox.
                log.warning("ingest.idempotency_store_failed", producer=producer.name, error=type(exc).__name__)
        return JSONResponse(response, status_code=202, headers=rate)

    async def _admit(self, producer: Producer, key: str | None, request_hash: str) -> tuple[Claim | None, dict[str, str]]:
        """Rate limit (429) and, for a keyed request, claim the key (409 / 422 / a stored answer).

        Returns the claim and the `RateLimit` fields every later answer carries.
        """
        limit = producer.rate_limit if producer.rate_limit is not None else self.config.rate_limit
        try:
            admission = await self.idempotency.admit(producer.name, limit, key, request_hash)
        except (RedisError, OSError) as exc:
            raise self._redis_down(exc) from None
        rate = rate_headers(admission.rate)
        if not admission.allowed:
            raise Refused(
                429,
                f"rate limit of {limit} requests in any {admission.rate.window_seconds} s reached; "
                f"retry in {admission.retry_after_seconds} s",
                {"Retry-After": str(admission.retry_after_seconds), **rate},
                name="rate-limited",
            )
        claim = admission.claim
        if claim is not None and claim.outcome == "mismatch":
            raise Refused(
                422,
                "this Idempotency-Key was already used for a different request",
                rate,
                name="idempotency-key-reused",
                errors=[
                    field_error(
                        ["header", "Idempotency-Key"],
                        "this key was already used for a different request",
                        "idempotency_key_reused",
                    )
                ],
            )
        if claim is not None and claim.outcome == "in_progress":
            raise Refused(
                409,
                "a request with this Idempotency-Key is still being processed",
                {"Retry-After": str(max(1, min(5, claim.retry_after_ms // 1000))), **rate},
                name="request-in-progress",
            )
        return claim, rate

    async def _release(self, producer: Producer, key: str, owner: str) -> None:
        try:
            await self.idempotency.release(producer.name, key, owner)
        except (RedisError, OSError) as exc:
            log.warning("ingest.idempotency_release_failed", producer=producer.name, error=type(exc).__name__)

    async def _refuse_second_starts(self, messages: list[Any]) -> None:
        """409 for an order.created whose order already has a saga (one saga per business key)."""
        repeated = duplicate_starts(messages)
        try:
            taken = sorted(set(repeated) | await taken_keys(self.engine, messages))
        except (SQLAlchemyError, OSError) as exc:
            log.warning("ingest.database_failed", error=type(exc).__name__)
            raise Refused(
                503,
                f"database unavailable: {type(exc).__name__}; nothing was accepted",
                {"Retry-After": "5"},
                name="unavailable",
            ) from None
        if taken:
            log.info("ingest.second_start_refused", keys=taken)
            raise Refused(
                409,
                f"already started: {', '.join(taken)} (one saga per business key; nothing was accepted)",
                name="already-started",
            )

    async def _write(self, messages: list[Any], now: datetime) -> None:
        try:
            # One transaction (shared with concurrent requests); an id already in the
            # outbox was accepted before (a retry after a crash) and is skipped.
            await self.writer.write([outbox_row(message, now) for message in messages])
        except RowsRefused as exc:
            # Only this request's rows; its neighbours in the shared commit went in.
            log.warning("ingest.rows_refused", reason=str(exc))
            raise Refused.invalid([field_error(["body"], str(exc), "database_refused")]) from None
        except (SQLAlchemyError, OSError) as exc:
            log.warning("ingest.database_failed", error=type(exc).__name__)
            raise Refused(
                503,
                f"database unavailable: {type(exc).__name__}; nothing was accepted",
                {"Retry-After": "5"},
                name="unavailable",
            ) from None

    @staticmethod
    def _redis_down(exc: BaseException) -> Refused:
        log.warning("ingest.redis_unavailable", error=type(exc).__name__)
        return Refused(
            503,
            f"idempotency store (Redis) unavailable ({type(exc).__name__}); nothing was accepted",
            {"Retry-After": "5"},
            name="unavailable",
        )

    async def ready(self) -> bool:
        """Whether events can be accepted now: the database and Redis answer.

        One check serves every probe for `health_cache_seconds`, and probes that arrive
        while it runs wait for it instead of opening connections of their own.
        """
        cached = self._readiness
        if cached is not None and time.monotonic() < cached[0]:
            return cached[1]
        if self._readiness_check is None or self._readiness_check.done():
            self._readiness_check = asyncio.create_task(self._check_readiness())
        return await asyncio.shield(self._readiness_check)

    async def _check_readiness(self) -> bool:
        async def database() -> None:
            async with self.engine.connect() as connection:
                await connection.execute(text("SELECT 1"))

        async def probe(check: Callable[[], Any]) -> str | None:
            try:
                await asyncio.wait_for(check(), timeout=_READINESS_TIMEOUT_SECONDS)
            except Exception as exc:  # noqa: BLE001 - a failed check is the answer, not an error
                return f"{type(exc).__name__}: {exc}"[:200]
            return None

        database_error, redis_error = await asyncio.gather(probe(database), probe(self.redis.ping))
        ready = database_error is None and redis_error is None
        if not ready:
            # The detail goes to the log, not to the unauthenticated caller.
            log.warning("ingest.not_ready", database=database_error, redis=redis_error)
        self._readiness = (time.monotonic() + self.config.health_cache_seconds, ready)
        return ready


def _optional_not_null(document: dict[str, Any]) -> None:
    """Describe an optional parameter as absent, not null: a header has no null.

    FastAPI writes `str | None` as ``anyOf: [string, null]``; a client (or a test
    generator) reading that may send the null as an empty header, which is refused.
    """
    for operation in (op for path in document.get("paths", {}).values() for op in path.values()):
        for parameter in operation.get("parameters", []):
            schema = parameter.get("schema", {})
            branches = [b for b in schema.get("anyOf", []) if b != {"type": "null"}]
            if not parameter.get("required") and len(branches) == 1 and len(schema["anyOf"]) == 2:
                rest = {key: value for key, value in schema.items() if key != "anyOf"}
                parameter["schema"] = {**branches[0], **rest}


def _problem_component(components: dict[str, Any]) -> None:
    """`Problem` (and the `FieldError` it refers to) as schema components."""
    schema = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in {**schema.pop("$defs", {}), "Problem": schema}.items():
        if components.setdefault(name, definition) != definition:
            raise ValueError(f"two OpenAPI components are named {name!r}")


def create_app(
    *,
    engine: AsyncEngine,
    redis: Redis,
    producers: ProducerDirectory,
    config: IngestConfig | None = None,
    clock: Clock | None = None,
    lifespan: Any = None,
) -> FastAPI:
    """Build the ingest app on an engine, a Redis client and a producer directory.

    Besides the events, the public port answers /livez and /readyz (and /health, the
    same as /readyz) with a status only. The operators' report (hosts, queues, relay
    lag, revision) is `compensa health`, or `compensa health --serve` on a private port.
    """
    config = config or IngestConfig()
    ingest = Ingest(engine, redis, producers, config, clock or _UtcClock())
    app = FastAPI(
        title="compensa ingest",
        version="1",
        description=(
            "Publish events into compensa. Each accepted event is committed to the ingest outbox "
            "before the 202; a relay publishes it to RabbitMQ. Send an `Idempotency-Key` so that "
            "a retried request is never accepted twice. Every error is an RFC 9457 problem "
            "(`application/problem+json`)."
        ),
        lifespan=lifespan,
    )
    app.state.ingest = ingest

    @app.exception_handler(Refused)
    async def _refused(request: Request, exc: Refused) -> Response:
        return exc.response(request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        # A header the route declares failed its constraints; the input itself is not echoed.
        errors = [field_error(list(error["loc"]), error["msg"], error["type"]) for error in exc.errors()]
        return Refused.invalid(errors).response(request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        # The framework's own refusals: 404 for an unknown path, 405 (with `Allow`) for a method.
        return problem(exc.status_code, str(exc.detail), path=request.url.path, headers=dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, _exc: Exception) -> Response:
        # Starlette re-raises the exception after this answer, so the server logs it
        # with its traceback; the client learns nothing of the internals.
        return problem(
            500,
            "unexpected error; the request may or may not have been accepted: retry it with the same Idempotency-Key",
            path=request.url.path,
        )

    def body_doc(schema: str) -> dict[str, Any]:
        return {
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
            }
        }

    accepted = {
        "model": Accepted,
        "description": "Committed to the outbox (or the stored answer to the same request under the same Idempotency-Key).",
        "headers": {
            **_rate_headers_doc(),
            "Idempotent-Replayed": {**_HEADER_DOCS["Idempotent-Replayed"], "required": False},
        },
    }
    responses: dict[int | str, dict[str, Any]] = {202: accepted, **_ERRORS}

    @app.post("/v1/events", status_code=202, responses=responses, openapi_extra=body_doc("EventIn"), tags=["events"])
    async def publish_event(
        request: Request,
        api_key: ApiKey = None,
        bearer: Bearer = None,
        idempotency_key: IdempotencyKey = None,
        traceparent: TraceParent = None,
    ) -> JSONResponse:
        """Accept one event (a full envelope or `{type, version?, correlation_id, payload}`)."""
        producer = await ingest.authenticate(api_key, bearer)
        request.state.producer = producer.name  # the request metrics' producer label
        return await ingest.handle(request, batch=False, producer=producer, key=idempotency_key, traceparent=traceparent)

    @app.post("/v1/events:batch", status_code=202, responses=responses, openapi_extra=body_doc("BatchIn"), tags=["events"])
    async def publish_batch(
        request: Request,
        api_key: ApiKey = None,
        bearer: Bearer = None,
        idempotency_key: IdempotencyKey = None,
        traceparent: TraceParent = None,
    ) -> JSONResponse:
        """Accept several events in one transaction: all of them or none."""
        producer = await ingest.authenticate(api_key, bearer)
        request.state.producer = producer.name  # the request metrics' producer label
        return await ingest.handle(request, batch=True, producer=producer, key=idempotency_key, traceparent=traceparent)

    @app.get("/v1/contracts", tags=["contracts"], responses=_UNEXPECTED)
    async def contracts() -> dict[str, Any]:
        """JSON Schema of every message (envelope + payload), keyed `type.vN`."""
        return json_schemas()

    no_store = {"Cache-Control": "no-store"}

    @app.get(
        "/livez",
        tags=["health"],
        responses={200: {"model": Health, "description": 'The process answers: `{"status": "ok"}`.'}, **_UNEXPECTED},
    )
    async def livez() -> JSONResponse:
        """Liveness: the process answers requests. Checks nothing else (a restart would not help a dependency)."""
        return JSONResponse({"status": "ok"}, headers=no_store)

    readiness_responses: dict[int | str, dict[str, Any]] = {
        200: {"model": Health, "description": 'Ready: `{"status": "ok"}`.'},
        503: _problem_doc(
            "`urn:compensa:problem:unavailable`: not ready; which dependency is down is in the server's log.",
            {"Retry-After": True},
        ),
        **_UNEXPECTED,
    }

    async def readiness(request: Request) -> Response:
        if await ingest.ready():
            return JSONResponse({"status": "ok"}, headers=no_store)
        return problem(
            503,
            "not ready: the database or Redis does not answer",
            path=request.url.path,
            name="unavailable",
            headers={**no_store, "Retry-After": "1"},
        )

    @app.get("/readyz", tags=["health"], responses=readiness_responses)
    async def readyz(request: Request) -> Response:
        """Readiness: can events be accepted now (the database and Redis answer)? Status only, cached for a second.

        Nothing about queues or the relay: accepting events needs neither. Which dependency
        is down is in the server's log; the operators' full report is `compensa health`.
        """
        return await readiness(request)

    @app.get("/health", tags=["health"], responses=readiness_responses)
    async def health(request: Request) -> Response:
        """The same as /readyz (kept for existing probes)."""
        return await readiness(request)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            _optional_not_null(schema)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, component in openapi_components(max_batch_events=config.max_batch_events).items():
                if components.setdefault(name, component) != component:
                    raise ValueError(f"two OpenAPI components are named {name!r}")
            _problem_component(components)
            if config.require_idempotency_key:
                for path in ("/v1/events", "/v1/events:batch"):
                    for parameter in schema["paths"][path]["post"]["parameters"]:
                        if parameter["name"] == "Idempotency-Key":
                            parameter["required"] = True
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the schema
    return app
