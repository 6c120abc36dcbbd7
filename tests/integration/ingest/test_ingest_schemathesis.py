"""Schemathesis drives the real ingest app from its own OpenAPI document.

The app runs in-process (ASGI) on the real PostgreSQL and Redis, with the request
telemetry middleware `compensa api` adds, authenticated as a producer allowed every
event type. Bodies are generated from the document: one variant
per event type with that event's payload schema from the contracts. Every answer must
be documented (status code, content type, body schema, the headers the document says
are sent: `Retry-After`, `RateLimit`, `RateLimit-Policy`, `WWW-Authenticate`) and none
may be a 5xx. Every error is a problem (`application/problem+json`, the `Problem`
schema), and the checks validate it as such.

- Positive phase: bodies the document allows. The rules JSON Schema cannot express
  (`correlation_id == payload.order_id`, an order's total, balanced postings, the
  producer's own name) are applied to each generated event before it is sent, so most
  of them reach the outbox: the test fails if none was accepted.
- Negative phase: bodies, headers and media types the document forbids. Still no 5xx,
  and nothing the document forbids is accepted.

Schemathesis runs the app on an event loop of its own (a thread), so the app gets an
engine and a Redis client of its own too: connections belong to the loop that opened them.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import jsonschema_rs
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from redis.asyncio import Redis
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core import NotSet
from schemathesis.python.asgi import shutdown_lifespans
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts import EVENTS
from contracts.messages import MAX_AMOUNT
from infra.db import create_engine
from infra.telemetry.http import RequestTelemetry
from producers.ingest import IngestConfig, ProducerDirectory, ProducerStore, create_app
from producers.ingest.submission import json_media_type
from tests.integration.support import clock

pytestmark = pytest.mark.integration

#: Cases Hypothesis generates per operation in the fuzzing phase of each test. The
#: coverage phase adds its own deterministic cases (about 440 per POST operation
#: positive, 1,250 negative); the file takes about 40 s on two shared cores.
MAX_EXAMPLES = 60
PRODUCER = "schemathesis"
CONFIG = IngestConfig(key_cache_seconds=60.0)
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


@pytest.fixture
async def producer_key(add_producer) -> str:
    return await add_producer(PRODUCER, tuple(sorted({m.message_type for m in EVENTS})), rate_limit=1_000_000)


@pytest.fixture
def ingest_app(pg_engine: AsyncEngine, redis_url: str, producer_key: str) -> Iterator[FastAPI]:
    """The ingest app with an engine and a Redis client that only Schemathesis's loop uses."""
    app_engine = create_engine(pg_engine.url.render_as_string(hide_password=False), pool_size=2)
    app_redis = Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await app_engine.dispose()
        await app_redis.aclose()

    config = dataclasses.replace(CONFIG, redis_prefix=f"test:{uuid.uuid4().hex[:8]}:")
    directory = ProducerDirectory(ProducerStore(app_engine), cache_seconds=config.key_cache_seconds)
    app = create_app(engine=app_engine, redis=app_redis, producers=directory, config=config, clock=clock, lifespan=lifespan)
    app.add_middleware(RequestTelemetry)  # as `compensa api` serves it (infra.api.build_app)
    assert app.openapi() == DOCUMENT, "the document tested is the one served"
    yield app
    # Schemathesis keeps an app's lifespan running until the process exits; end it
    # here, on its loop, so the connections close before the database is dropped.
    shutdown_lifespans()


def _document() -> dict[str, Any]:
    """The OpenAPI document the app serves; building the app opens no connection."""
    app = create_app(
        engine=create_engine("postgresql+asyncpg://unused/unused"),
        redis=Redis(),
        producers=ProducerDirectory(),
        config=CONFIG,
    )
    return app.openapi()


def _schema(mode: str) -> Any:
    config = schemathesis.Config.from_dict(
        {
            "generation": {"mode": mode, "max-examples": MAX_EXAMPLES},
            "phases": {"stateful": {"enabled": False}},
        }
    )
    return schemathesis.openapi.from_dict(DOCUMENT, config=config)


@pytest.fixture
def answers() -> Iterator[Counter[tuple[str, int]]]:
    """Status codes seen, per operation; the positive phase must have had events accepted."""
    seen: Counter[tuple[str, int]] = Counter()
    yield seen
    posted = {label for label, _status in seen if label.startswith("POST")}
    accepted = {label for label, status in seen if status == 202}
    assert posted <= accepted, f"no event was accepted: {dict(seen)}"


def keep_cross_field_rules(body: Any) -> None:
    """Make generated events keep the rules the document states in words (see EventIn).

    Bodies of the negative phase may be anything: a rule that does not apply is skipped.
    """
    events = body.get("events") if isinstance(body, dict) and "events" in body else [body]
    for event in events if isinstance(events, list) else []:
        try:
            payload = event["payload"]
            event["correlation_id"] = payload["order_id"]
            if event.get("producer") is not None:
                event["producer"] = PRODUCER
            if event["type"] == "order.created":
                lines = payload["lines"]
                if sum(line["quantity"] * line["unit_price"] for line in lines) > MAX_AMOUNT:
                    for line in lines:
                        line["unit_price"] = min(line["unit_price"], MAX_AMOUNT // (100 * 1_000_000))
                payload["total"]["amount"] = sum(line["quantity"] * line["unit_price"] for line in lines)
            elif event["type"] == "ledger.updated":
                for posting in payload["postings"]:
                    posting["credit"] = posting["debit"]
        except (KeyError, TypeError, AttributeError, IndexError):
            continue


@functools.cache
def _body_validator(path: str) -> Any:
    """The document's request body schema (Schemathesis's own validator: thousands of cases, microseconds each)."""
    name = "BatchIn" if path.endswith(":batch") else "EventIn"
    root = {"$ref": f"#/components/schemas/{name}", "components": DOCUMENT["components"]}
    return jsonschema_rs.validator_for(root, validate_formats=True)


def _whole_numbers(value: Any) -> Any:
    """`5.0` as `5`: JSON Schema counts it as an integer, the contracts (strict) do not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _whole_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(item) for item in value]
    return value


def _documented(path: str, body: Any) -> bool:
    try:
        return bool(_body_validator(path).is_valid(body))
    except ValueError:  # not JSON at all: a media-type probe sends bytes
        return False


def prepare(case: Any) -> None:
    """Apply what the schema cannot say, so that the server's answer tests the part it can.

    Without this nearly every body is refused for `correlation_id != payload.order_id`
    or a reused Idempotency-Key, which hides whether the rest was accepted. A negative
    case keeps its defect: the rules are not applied where they would mend the body,
    and a broken Idempotency-Key is kept only when the body and its media type are
    fine (the header is checked first, so it would hide the other defect).
    """
    negative = case.meta is not None and case.meta.generation.mode == GenerationMode.NEGATIVE
    media_type = (case.headers or {}).get("Content-Type", case.media_type)
    body_broken = negative and (isinstance(case.body, NotSet) or not json_media_type(media_type))
    if not isinstance(case.body, NotSet):
        body = copy.deepcopy(case.body) if negative else _whole_numbers(case.body)
        keep_cross_field_rules(body)
        body_broken = body_broken or (negative and not _documented(case.operation.path, case.body))
        # A negative body the rules would mend keeps its defect (and the 422 that goes with it).
        if not (body_broken and _documented(case.operation.path, body)):
            case.body = body
    key = (case.headers or {}).get("Idempotency-Key")
    if key is None:
        return
    unique = uuid.uuid4().hex
    if isinstance(key, str) and _IDEMPOTENCY_KEY.fullmatch(key):
        # Generated keys repeat ("!" for every body): keep each key's length and characters, unique per case.
        case.headers["Idempotency-Key"] = (unique + key)[: min(255, max(len(key), len(unique)))]
    elif body_broken:
        case.headers["Idempotency-Key"] = unique


# Loaded when the module is: `schemathesis.pytest.from_fixture` (4.32) reads
# `Function._nodeid`, which pytest 9.2 no longer has. The app is passed to each call.
DOCUMENT = _document()
positive = _schema("positive")
# GET /livez, /readyz, /health and /v1/contracts take no input to break.
negative = _schema("negative").include(method="POST")
_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
)


@positive.parametrize()
@_SETTINGS
def test_documented_bodies_get_documented_answers(
    case: Any, ingest_app: FastAPI, producer_key: str, answers: Counter[tuple[str, int]]
) -> None:
    prepare(case)
    response = case.call_and_validate(app=ingest_app, headers={"X-API-Key": producer_key}, checks=CHECKS)
    answers[(case.operation.label, response.status_code)] += 1


@negative.parametrize()
@_SETTINGS
def test_forbidden_input_is_refused_never_a_server_error(case: Any, ingest_app: FastAPI, producer_key: str) -> None:
    prepare(case)
    case.call_and_validate(app=ingest_app, headers={"X-API-Key": producer_key}, checks=[*CHECKS, negative_data_rejection])
