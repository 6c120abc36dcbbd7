"""The HTTP ingest on real PostgreSQL and Redis: validation, keys, limits, idempotency.

An accepted event is a row in the ingest outbox before the 202; a refused one leaves
nothing. The same Idempotency-Key and body always get the first answer and one event,
however the retries arrive (in sequence, concurrently, or after the response was lost).
"""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import event, select, text

from contracts import decode
from infra.logging import configure_logging
from producers.ingest.tables import ingest_producers
from tests.integration.support import (
    OUTBOX,
    clock,
    outbox_count,
    outbox_rows,
)
from tests.support import HOSTILE_EVENTS, dump, order_created, short_event

pytestmark = pytest.mark.integration


async def test_short_form_is_committed_to_the_outbox_before_202(make_client, add_producer, engine):
    client = make_client(await add_producer("erp"))
    response = await client.post("/v1/events", json=short_event("o-1"))
    assert response.status_code == 202, response.text
    message_id = response.json()["message_id"]
    assert response.json()["message_ids"] == [message_id]
    [row] = await outbox_rows(engine)
    assert row.message_id == message_id and row.exchange == "compensa.events" and row.routing_key == "order.created"
    message = decode(row.body)
    assert message.envelope.producer == "erp" and message.correlation_id == "o-1" and message.envelope.version == 1
    assert message.payload.total.amount == 3000


async def test_full_envelope_keeps_its_id_and_time(make_client, add_producer, engine):
    client = make_client(await add_producer("erp"))
    message_id = uuid.uuid4()
    occurred = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    envelope = {
        **short_event("o-2"),
        "message_id": str(message_id),
        "version": 1,
        "occurred_at": occurred.isoformat(),
        "producer": "erp",
        "causation_id": None,
        "traceparent": None,
    }
    response = await client.post("/v1/events", json=envelope)
    assert response.status_code == 202, response.text
    assert response.json()["message_id"] == str(message_id)
    [row] = await outbox_rows(engine)
    assert decode(row.body).envelope.occurred_at == occurred
    # A different producer name in the envelope is refused, naming the field.
    response = await client.post("/v1/events", json={**envelope, "message_id": str(uuid.uuid4()), "producer": "someone-else"})
    assert response.status_code == 422
    assert response.json()["errors"][0]["loc"] == ["body", "producer"]


@pytest.mark.parametrize(
    ("body", "loc", "fragment"),
    [
        ({"type": "order.created", "payload": order_created()}, ["body", "correlation_id"], "Field required"),
        (
            short_event(payload=order_created(total={"amount": 3000, "currency": "euro"})),
            ["body", "payload", "total", "currency"],
            "pattern",
        ),
        (short_event(payload={**order_created(), "lines": []}), ["body", "payload", "lines"], "at least 1"),
        (short_event(type="order.shipped"), ["body", "type"], "unknown message type"),
        (short_event(version=7), ["body", "version"], "unknown version"),
        (short_event(type="stock.reserve"), ["body", "type"], "command"),
        ({**short_event(), "colour": "red"}, ["body", "colour"], "Extra inputs"),
        ([short_event()], ["body"], "valid dictionary"),
    ],
    ids=[
        "missing-correlation-id",
        "bad-currency",
        "no-lines",
        "unknown-type",
        "unknown-version",
        "command",
        "extra-field",
        "not-an-object",
    ],
)
async def test_invalid_body_is_422_naming_the_field(make_client, add_producer, engine, body, loc, fragment):
    client = make_client(await add_producer("erp", ("order.created", "order.cancelled")))
    response = await client.post("/v1/events", json=body)
    assert response.status_code == 422, response.text
    errors = response.json()["errors"]
    assert any(e["loc"] == loc and fragment in e["msg"] for e in errors), errors
    assert await outbox_count(engine) == 0


async def test_invalid_json_is_422(make_client, add_producer, engine):
    client = make_client(await add_producer("erp"))
    response = await client.post("/v1/events", content=b'{"type": ', headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert response.json()["errors"][0]["loc"] == ["body"] and "invalid JSON" in response.json()["errors"][0]["msg"]


async def test_batch_is_all_or_nothing(make_client, add_producer, engine):
    client = make_client(await add_producer("erp"))
    events = [short_event(f"o-{n}") for n in range(3)]
    bad = [events[0], short_event("o-x", payload=order_created(total={"amount": 1, "currency": "EUR"})), events[2]]
    response = await client.post("/v1/events:batch", json={"events": bad})
    assert response.status_code == 422
    assert {tuple(e["loc"][:4]) for e in response.json()["errors"]} == {("body", "events", 1, "payload")}
    assert await outbox_count(engine) == 0
    response = await client.post("/v1/events:batch", json={"events": events})
    assert response.status_code == 202
    ids = response.json()["message_ids"]
    assert [r.message_id for r in await outbox_rows(engine)] == ids and len(set(ids)) == 3


async def test_retry_with_the_same_key_gets_the_same_response_and_one_event(make_client, add_producer, engine):
    client = make_client(await add_producer("erp"))
    headers = {"Idempotency-Key": "order-o-1-created"}
    first = await client.post("/v1/events", json=short_event("o-1"), headers=headers)
    again = await client.post("/v1/events", json=short_event("o-1"), headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json() == again.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert await outbox_count(engine) == 1
    # The same key from another producer is another request.
    other = make_client(await add_producer("crm"))
    third = await other.post("/v1/events", json=short_event("o-2"), headers=headers)
    assert third.status_code == 202 and third.json() != first.json()
    assert await outbox_count(engine) == 2


async def test_another_producer_cannot_start_an_order_that_has_a_saga(make_client, add_producer, engine):
    first = await make_client(await add_producer("erp")).post("/v1/events", json=short_event("o-1"))
    assert first.status_code == 202
    other = make_client(await add_producer("crm"))

    second = await other.post("/v1/events", json=short_event("o-1"))
    assert second.status_code == 409 and "o-1" in second.json()["detail"]
    twice = await other.post("/v1/events:batch", json={"events": [short_event("o-2"), short_event("o-2")]})
    assert twice.status_code == 409 and "o-2" in twice.json()["detail"]
    assert await outbox_count(engine) == 1


async def test_a_retry_of_an_accepted_start_is_no_second_start_even_after_its_saga_began(make_client, add_producer, engine):
    from infra.clock import SystemClock
    from outbox.uow import UnitOfWork
    from sagas import ORDER_SAGA
    from sagas.orchestrator import Orchestrator

    key = await add_producer("erp")
    headers = {"Idempotency-Key": "erp-order-o-retried"}
    first = await make_client(key).post("/v1/events", json=short_event("o-retried"), headers=headers)
    assert first.status_code == 202
    [row] = await outbox_rows(engine)
    started = decode(row.body)
    async with UnitOfWork(engine, "saga", SystemClock(), incoming=started) as uow:
        await Orchestrator([ORDER_SAGA]).handle(uow, started)
        await uow.commit()
    async with engine.begin() as connection:  # the outbox row pruned: only the saga knows the start
        await connection.execute(text("DELETE FROM ingest_outbox"))

    # The idempotency record is gone (its TTL passed): the retry runs again, with the same ids.
    retry = await make_client(key, redis_prefix=f"test:{uuid.uuid4().hex[:8]}:").post(
        "/v1/events", json=short_event("o-retried"), headers=headers
    )
    assert retry.status_code == 202 and retry.json()["message_id"] == first.json()["message_id"]
    other = await make_client(key).post("/v1/events", json=short_event("o-retried"))
    assert other.status_code == 409


async def test_a_correlation_id_other_than_the_order_id_is_422(make_client, add_producer, engine):
    client = make_client(await add_producer("erp"))
    event = short_event("o-1") | {"correlation_id": "someone-elses-saga"}
    response = await client.post("/v1/events", json=event)
    assert response.status_code == 422
    [error] = response.json()["errors"]
    assert error["loc"] == ["body", "correlation_id"] and error["type"] == "saga_key_mismatch"
    assert await outbox_count(engine) == 0


async def test_same_key_with_another_body_is_422(make_client, add_producer, engine):
    client = make_client(await add_producer("erp"))
    headers = {"Idempotency-Key": "k-1"}
    assert (await client.post("/v1/events", json=short_event("o-1"), headers=headers)).status_code == 202
    response = await client.post("/v1/events", json=short_event("o-2"), headers=headers)
    assert response.status_code == 422
    assert response.json()["type"] == "urn:compensa:problem:idempotency-key-reused"
    assert response.json()["errors"][0]["loc"] == ["header", "Idempotency-Key"]
    assert response.json()["errors"][0]["type"] == "idempotency_key_reused"
    # Same body, other endpoint: another request too.
    response = await client.post("/v1/events:batch", json={"events": [short_event("o-1")]}, headers=headers)
    assert response.status_code == 422
    assert await outbox_count(engine) == 1


async def test_a_refused_request_releases_its_key(make_client, add_producer, engine):
    client = make_client(await add_producer("erp"))
    headers = {"Idempotency-Key": "k-fix"}
    bad = short_event("o-1", payload=order_created(total={"amount": 3000, "currency": "eu"}))
    assert (await client.post("/v1/events", json=bad, headers=headers)).status_code == 422
    assert (await client.post("/v1/events", json=short_event("o-1"), headers=headers)).status_code == 202
    assert await outbox_count(engine) == 1


async def test_concurrent_duplicates_make_exactly_one_event(make_client, add_producer, engine):
    client = make_client(await add_producer("erp"))
    headers = {"Idempotency-Key": "k-race"}
    responses = await asyncio.gather(*(client.post("/v1/events", json=short_event("o-race"), headers=headers) for _ in range(20)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {202, 409}, statuses
    assert 202 in statuses
    assert len({r.json()["message_id"] for r in responses if r.status_code == 202}) == 1
    assert all(r.headers["Retry-After"].isdigit() for r in responses if r.status_code == 409)
    assert await outbox_count(engine) == 1


async def test_concurrent_requests_share_commits_and_keep_their_own_ids(make_app, add_producer, engine):
    import httpx

    app = make_app()
    key = await add_producer("erp")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://ingest", headers={"X-API-Key": key}
    ) as client:
        responses = await asyncio.gather(
            *(client.post("/v1/events", json=short_event(f"o-{n}"), headers={"Idempotency-Key": f"k-{n}"}) for n in range(30))
        )
    assert [r.status_code for r in responses] == [202] * 30
    ids = [r.json()["message_id"] for r in responses]
    rows = await outbox_rows(engine)
    assert sorted(r.message_id for r in rows) == sorted(ids)
    assert {decode(r.body).correlation_id for r in rows} == {f"o-{n}" for n in range(30)}
    assert app.state.ingest.writer.commits <= 30


async def test_retry_after_a_crash_before_the_response_was_stored_gets_the_same_ids(make_client, add_producer, engine, redis):
    """Committed, then the process died before storing the response: the marker expired, the retry re-runs."""
    client = make_client(await add_producer("erp"))
    headers = {"Idempotency-Key": "k-crash"}
    batch = {"events": [short_event("o-1"), short_event("o-2")]}
    first = await client.post("/v1/events:batch", json=batch, headers=headers)
    assert first.status_code == 202
    deleted = 0
    async for name in redis.scan_iter(match="test:*{erp}:idem:k-crash"):
        deleted += await redis.delete(name)
    assert deleted == 1
    retry = await client.post("/v1/events:batch", json=batch, headers=headers)
    assert retry.status_code == 202 and "Idempotent-Replayed" not in retry.headers
    assert retry.json() == first.json()
    assert await outbox_count(engine) == 2


async def test_missing_unknown_or_revoked_key_is_401(make_client, add_producer, engine):
    key = await add_producer("erp")
    key_id = key.split("_")[1]
    for presented in (None, "nonsense", f"cpk_{key_id}_wrong-secret", "cpk_0000000000000000_" + key.split("_", 2)[2]):
        client = make_client(presented)
        response = await client.post("/v1/events", json=short_event())
        assert response.status_code == 401, presented
        assert response.headers["WWW-Authenticate"] == "Bearer"
    bearer = make_client()
    assert (await bearer.post("/v1/events", json=short_event(), headers={"Authorization": f"Bearer {key}"})).status_code == 202
    from producers.ingest import ProducerStore

    await ProducerStore(engine).revoke("erp", datetime.now(UTC))
    assert (await make_client(key).post("/v1/events", json=short_event("o-retried"))).status_code == 401
    assert await outbox_count(engine) == 1


async def test_disallowed_type_is_403(make_client, add_producer, engine):
    client = make_client(await add_producer("erp", ("order.cancelled",)))
    response = await client.post("/v1/events", json=short_event())
    assert response.status_code == 403
    assert "order.created" in response.json()["detail"] and "order.cancelled" in response.json()["detail"]
    batch = {
        "events": [
            {"type": "order.cancelled", "correlation_id": "o-1", "payload": {"order_id": "o-1", "reason": "x"}},
            short_event(),
        ]
    }
    assert (await client.post("/v1/events:batch", json=batch)).status_code == 403
    assert await outbox_count(engine) == 0


async def test_every_error_is_a_problem_document(make_client, make_app, add_producer, engine):
    """RFC 9457 for the API's refusals and the framework's alike: type, title, status, detail, instance."""
    key = await add_producer("erp")
    client = make_client(key)

    async def problem_of(response: httpx.Response, status: int, type_: str = "about:blank") -> dict[str, Any]:
        assert response.status_code == status, response.text
        assert response.headers["Content-Type"] == "application/problem+json"
        body = response.json()
        assert set(body) >= {"type", "title", "status", "detail", "instance"}, body
        assert (body["type"], body["status"], body["instance"]) == (type_, status, response.request.url.path)
        return body

    unauthenticated = await problem_of(await make_client().post("/v1/events", json=short_event()), 401)
    assert unauthenticated["title"] == "Unauthorized"
    text = await client.post("/v1/events", content=b"{}", headers={"Content-Type": "text/plain"})
    assert (await problem_of(text, 415))["title"] == "Unsupported Media Type"
    assert (await problem_of(await client.get("/v1/nothing-here"), 404))["title"] == "Not Found"
    not_allowed = await client.get("/v1/events")
    assert (await problem_of(not_allowed, 405))["title"] == "Method Not Allowed" and not_allowed.headers["Allow"] == "POST"
    # A header FastAPI validates (pattern, length) is a 422 problem naming it, without echoing it.
    bad_key = await client.post("/v1/events", json=short_event(), headers={"Idempotency-Key": "two words"})
    invalid = await problem_of(bad_key, 422, "urn:compensa:problem:invalid-request")
    assert [e["loc"] for e in invalid["errors"]] == [["header", "Idempotency-Key"]] and "input" not in invalid["errors"][0]
    assert invalid["detail"].startswith("header.Idempotency-Key: ")
    contract = await client.post("/v1/events", json={**short_event(), "colour": "red"})
    assert (await problem_of(contract, 422, "urn:compensa:problem:invalid-request"))["errors"][0]["loc"] == ["body", "colour"]
    assert await outbox_count(engine) == 0


async def test_a_missing_idempotency_key_is_400_when_required(make_client, add_producer, engine):
    """draft-ietf-httpapi-idempotency-key-header: 400 (not 428), with a problem type of its own."""
    client = make_client(await add_producer("erp"), require_idempotency_key=True)
    response = await client.post("/v1/events", json=short_event())
    assert response.status_code == 400 and response.headers["Content-Type"] == "application/problem+json"
    assert response.json()["type"] == "urn:compensa:problem:idempotency-key-missing"
    assert (await client.post("/v1/events", json=short_event(), headers={"Idempotency-Key": "k-1"})).status_code == 202
    assert await outbox_count(engine) == 1


async def test_an_unexpected_error_is_a_500_problem_that_leaks_nothing(engine, redis):
    from producers.ingest import IngestConfig, ProducerDirectory, create_app

    class BrokenDirectory(ProducerDirectory):
        async def authenticate(self, presented: str | None) -> Any:
            raise RuntimeError("bug at postgresql://compensa:s3cret@db.internal/compensa")

    app = create_app(
        engine=engine,
        redis=redis,
        producers=BrokenDirectory(),
        config=IngestConfig(redis_prefix=f"test:{uuid.uuid4().hex[:8]}:"),
        clock=clock,
    )
    # Starlette answers, then re-raises for the server to log: the transport must not raise it here.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://ingest") as client:
        response = await client.post("/v1/events", json=short_event(), headers={"X-API-Key": "cpk_x_y"})
    assert response.status_code == 500 and response.headers["Content-Type"] == "application/problem+json"
    body = response.json()
    assert (body["type"], body["title"], body["status"], body["instance"]) == (
        "about:blank",
        "Internal Server Error",
        500,
        "/v1/events",
    )
    assert "Idempotency-Key" in body["detail"]
    for secret in ("s3cret", "db.internal", "RuntimeError", "postgresql"):
        assert secret not in response.text


async def test_body_over_the_size_limit_is_413(make_client, add_producer, engine):
    client = make_client(await add_producer("erp"), max_request_bytes=2048)
    big = short_event(payload={**order_created(), "customer_id": "c" * 4000})
    response = await client.post("/v1/events", json=big)
    assert response.status_code == 413

    # Without a Content-Length (chunked), the limit holds while reading.
    async def chunks():
        for _ in range(5):
            yield b" " * 1000

    response = await client.post("/v1/events", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert await outbox_count(engine) == 0


NOT_READY = {
    "type": "urn:compensa:problem:unavailable",
    "title": "Service unavailable",
    "status": 503,
    "detail": "not ready: the database or Redis does not answer",
}


async def test_redis_down_is_503_nothing_accepted_and_not_ready_but_live(make_client, add_producer, engine, redis_server):
    client = make_client(await add_producer("erp"), health_cache_seconds=0.0)
    assert (await client.get("/readyz")).status_code == 200
    redis_server.stop()
    try:
        for headers in ({"Idempotency-Key": "k-down"}, {}):
            response = await client.post("/v1/events", json=short_event(), headers=headers)
            assert response.status_code == 503, response.text
            assert response.json()["type"] == "urn:compensa:problem:unavailable"
            assert "Redis" in response.json()["detail"] and response.headers["Retry-After"].isdigit()
        for path in ("/readyz", "/health"):
            ready = await client.get(path)
            assert ready.status_code == 503 and ready.json() == {**NOT_READY, "instance": path}
            assert ready.headers["Content-Type"] == "application/problem+json"
            assert ready.headers["Retry-After"].isdigit()
        # The process itself is fine: restarting it would not bring Redis back.
        live = await client.get("/livez")
        assert live.status_code == 200 and live.json() == {"status": "ok"}
        assert await outbox_count(engine) == 0
    finally:
        redis_server.start()
    response = await client.post("/v1/events", json=short_event(), headers={"Idempotency-Key": "k-down"})
    assert response.status_code == 202
    assert (await client.get("/readyz")).status_code == 200


async def test_contracts_and_openapi_are_served(make_client):
    client = make_client()
    contracts = (await client.get("/v1/contracts")).json()
    assert contracts["order.created.v1"]["properties"]["payload"]["title"] == "OrderCreated"
    openapi = (await client.get("/openapi.json")).json()
    assert {"/v1/events", "/v1/events:batch", "/v1/contracts", "/livez", "/readyz", "/health"} <= set(openapi["paths"])
    post = openapi["paths"]["/v1/events"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/EventIn"
    assert "EventIn" in openapi["components"]["schemas"] and "BatchIn" in openapi["components"]["schemas"]
    assert {"202", "401", "403", "409", "413", "415", "422", "429", "503"} <= set(post["responses"])
    assert any(p["name"] == "Idempotency-Key" for p in post["parameters"])
    assert (await client.get("/docs")).status_code == 200


async def test_secrets_never_appear_in_logs(make_client, add_producer, engine):
    stream = io.StringIO()
    configure_logging("DEBUG", "json", stream=stream)
    try:
        key = await add_producer("erp")
        secret = key.split("_", 2)[2]
        await make_client(key).post("/v1/events", json=short_event(), headers={"Idempotency-Key": "k-log"})
        await make_client(key[:-3] + "xyz").post("/v1/events", json=short_event())
        await make_client().post("/v1/events", json=short_event(), headers={"Authorization": f"Bearer {key}"})
        structlog.get_logger("t").info("request", api_key=key, headers={"authorization": f"Bearer {key}"})
    finally:
        configure_logging("INFO", "json")
    output = stream.getvalue()
    assert "ingest.accepted" in output
    assert secret not in output and key not in output
    # And the database holds only the salted hash.
    async with engine.connect() as connection:
        stored = [dict(r._mapping) for r in (await connection.execute(select(ingest_producers))).all()]
    assert stored and all(secret not in json.dumps(row, default=str) for row in stored)


async def test_health_is_status_only(engine, redis, make_client):
    """The public port says ready or not; hosts, users, queues and revisions are `compensa health`'s."""
    from producers.ingest import IngestConfig, ProducerDirectory, create_app
    from tests.integration.support import clock

    app = create_app(
        engine=engine,
        redis=redis,
        producers=ProducerDirectory(None, []),
        config=IngestConfig(redis_prefix=f"test:{uuid.uuid4().hex[:8]}:"),
        clock=clock,
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingest") as client:
        for path in ("/livez", "/readyz", "/health"):
            response = await client.get(path)
            assert response.status_code == 200 and response.json() == {"status": "ok"}, path
            assert response.headers["Cache-Control"] == "no-store"
            text = response.text.lower()
            for internal in ("127.0.0.1", "postgres", "redis", "queue", "revision", "url", "guest", "checks"):
                assert internal not in text
    assert (await make_client().get("/readyz")).json() == {"status": "ok"}


async def test_40_concurrent_health_probes_all_get_200_from_one_check(make_app, engine):
    app = make_app()
    checkouts = 0

    def count(*_args: object) -> None:
        nonlocal checkouts
        checkouts += 1

    pool = engine.sync_engine.pool
    event.listen(pool, "checkout", count)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingest") as client:
            responses = await asyncio.gather(*(client.get("/health") for _ in range(40)))
            # Within the cache's second, further probes reuse the answer.
            again = await asyncio.gather(*(client.get("/health") for _ in range(40)))
    finally:
        event.remove(pool, "checkout", count)
    assert [r.status_code for r in responses + again] == [200] * 80
    assert {r.text for r in responses + again} == {'{"status":"ok"}'}
    assert 1 <= checkouts <= 2, checkouts


async def test_writer_commits_a_request_larger_than_one_statement_in_one_transaction(engine):
    """Rows past `max_rows` go in several statements of one transaction; duplicates are skipped."""
    from contracts import OrderCancelled, new_message
    from outbox.uow import outbox_row
    from producers.ingest.writer import OutboxWriter
    from tests.integration.support import OUTBOX, clock

    writer = OutboxWriter(engine, OUTBOX, max_rows=2)
    rows = [
        outbox_row(
            new_message(OrderCancelled(order_id=f"o-{n}", reason="x"), correlation_id=f"o-{n}", producer="erp"), clock.now()
        )
        for n in range(5)
    ]
    await asyncio.gather(writer.write(rows), writer.write(rows[:1]), writer.write([rows[4]]))
    assert sorted(r.message_id for r in await outbox_rows(engine)) == sorted(r["message_id"] for r in rows)


async def test_database_down_is_503_nothing_accepted_and_the_key_is_free_again(engine, redis):
    """The API reaches PostgreSQL through a link the test cuts: what a client sees when it is down."""
    from sqlalchemy.engine import make_url

    from infra.db import create_engine
    from producers.ingest import IngestConfig, ProducerDirectory, create_app, generate_key
    from tests.integration.support import clock
    from tests.support import CuttableLink

    url = make_url(engine.url.render_as_string(hide_password=False))
    link = await CuttableLink(url.host or "127.0.0.1", url.port or 5432).start()
    linked = create_engine(url.set(host="127.0.0.1", port=link.port).render_as_string(hide_password=False))
    # A key from the keys file: authenticating it needs no database.
    key, record = generate_key("erp", ("order.created",), rate_limit=None, now=clock.now())
    app = create_app(
        engine=linked,
        redis=redis,
        producers=ProducerDirectory(None, [record]),
        config=IngestConfig(redis_prefix=f"test:{uuid.uuid4().hex[:8]}:", health_cache_seconds=0.0),
        clock=clock,
    )
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingest", headers={"X-API-Key": key})
    event = short_event("o-db")
    try:
        assert (await client.post("/v1/events", json=short_event("o-up"), headers={"Idempotency-Key": "k-up"})).status_code == 202
        assert await outbox_count(engine) == 1
        await link.cut()
        response = await client.post("/v1/events", json=event, headers={"Idempotency-Key": "k-db"})
        assert response.status_code == 503, response.text
        assert "database unavailable" in response.json()["detail"] and "nothing was accepted" in response.json()["detail"]
        assert response.headers["Retry-After"].isdigit()
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and ready.json() == {**NOT_READY, "instance": "/readyz"}
        assert (await client.get("/livez")).status_code == 200
        assert await outbox_count(engine) == 1
        await link.restore()
        # The refused request left its key free: the retry is accepted once.
        retried = await client.post("/v1/events", json=event, headers={"Idempotency-Key": "k-db"})
        assert retried.status_code == 202, retried.text
        again = await client.post("/v1/events", json=event, headers={"Idempotency-Key": "k-db"})
        assert again.status_code == 202 and again.json() == retried.json()
        assert await outbox_count(engine) == 2
        assert (await client.get("/readyz")).status_code == 200
    finally:
        await client.aclose()
        await linked.dispose()
        await link.close()


# ---------------------------------------------------------------- hostile input: a precise 4xx, never a 5xx

#: What the API may answer a body it cannot accept (documented in the OpenAPI document).
REFUSALS = {400, 403, 413, 415, 422}


def raw_event(correlation_id: str = '"o-h"', payload: str | None = None, **fields: str) -> bytes:
    """An order.created in the short form, written by hand so any JSON text can go anywhere."""
    payload = payload if payload is not None else json.dumps(order_created("o-h"))
    extra = "".join(f', "{name}": {value}' for name, value in fields.items())
    return f'{{"type": "order.created", "correlation_id": {correlation_id}, "payload": {payload}{extra}}}'.encode()


def with_amount(amount: str) -> str:
    return json.dumps(order_created("o-h")).replace('"amount": 3000', f'"amount": {amount}')


HOSTILE = [
    # (id, body, content type, status, loc of the first error, its type)
    ("nested-10k-arrays", b"[" * 10_000 + b"]" * 10_000, "application/json", 422, ["body"], "json_too_deep"),
    ("nested-100k-arrays", b"[" * 100_000 + b"]" * 100_000, "application/json", 422, ["body"], "json_too_deep"),
    ("nested-100k-objects", b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "application/json", 422, ["body"], "json_too_deep"),
    (
        "nested-in-payload",
        raw_event(payload='{"x": ' + "[" * 40 + "]" * 40 + "}"),
        "application/json",
        422,
        ["body"],
        "json_too_deep",
    ),
    (
        "5000-digit-integer",
        raw_event(payload=with_amount("9" * 5000)),
        "application/json",
        422,
        ["body", "payload", "total", "amount"],
        "int_out_of_range",
    ),
    (
        "2**64",
        raw_event(payload=with_amount(str(2**64))),
        "application/json",
        422,
        ["body", "payload", "total", "amount"],
        "int_out_of_range",
    ),
    (
        "huge-exponent",
        raw_event(payload=with_amount("1e999")),
        "application/json",
        422,
        ["body", "payload", "total", "amount"],
        "number_not_finite",
    ),
    (
        "NaN",
        raw_event(payload=with_amount("NaN")),
        "application/json",
        422,
        ["body", "payload", "total", "amount"],
        "number_not_finite",
    ),
    ("surrogate-correlation-id", raw_event('"o-\\ud800"'), "application/json", 422, ["body", "correlation_id"], "string_unicode"),
    (
        "surrogate-in-payload",
        raw_event(payload=json.dumps(order_created("o-h", customer_id="c-\udfff"))),
        "application/json",
        422,
        ["body", "payload", "customer_id"],
        "string_unicode",
    ),
    (
        "surrogate-in-key",
        raw_event(extra='{"\\ud800": 1}'),
        "application/json",
        422,
        ["body", "extra", "\\ud800"],
        "string_unicode",
    ),
    (
        "surrogate-in-unknown-type",
        b'{"type": "\\udc00", "correlation_id": "o", "payload": {}}',
        "application/json",
        422,
        ["body", "type"],
        "string_unicode",
    ),
    ("nul-correlation-id", raw_event('"o-\\u0000"'), "application/json", 422, ["body", "correlation_id"], "string_nul"),
    (
        "nul-in-free-text",
        raw_event(payload=json.dumps(order_created("o-h", note="a\x00b"))),
        "application/json",
        422,
        ["body", "payload", "note"],
        "string_nul",
    ),
    (
        "escape-in-correlation-id",
        raw_event('"o-\\u001b[31m"'),
        "application/json",
        422,
        ["body", "correlation_id"],
        "string_control_character",
    ),
    (
        "newline-in-sku",
        raw_event(payload=json.dumps(order_created("o-h")).replace('"SKU-1"', '"SKU\\n1"')),
        "application/json",
        422,
        ["body", "payload", "lines", 0, "sku"],
        "string_control_character",
    ),
    (
        "del-in-producer",
        raw_event(producer='"erp\x7f"'),
        "application/json",
        422,
        ["body", "producer"],
        "string_control_character",
    ),
    ("not-utf-8", raw_event('"o-X"').replace(b"X", b"\xff"), "application/json", 422, ["body"], "json_invalid"),
    ("utf-16", json.dumps({"type": "order.created"}).encode("utf-16"), "application/json", 422, ["body"], "json_invalid"),
    ("empty", b"", "application/json", 422, ["body"], "json_invalid"),
    ("text-plain", raw_event(), "text/plain", 415, None, None),
    ("form", b"type=order.created", "application/x-www-form-urlencoded", 415, None, None),
    ("no-content-type", raw_event(), None, 415, None, None),
    ("latin-1-charset", raw_event(), "application/json; charset=latin-1", 415, None, None),
]


@pytest.mark.parametrize(
    ("body", "content_type", "status", "loc", "type_"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE]
)
async def test_hostile_body_is_a_precise_4xx_and_leaves_nothing(
    make_client, add_producer, engine, body, content_type, status, loc, type_
):
    client = make_client(await add_producer("erp"))
    headers = {"Content-Type": content_type} if content_type else {}
    sends = [("/v1/events", body, loc)]
    if body.startswith(b'{"type"'):
        # As the only event of a batch, its errors name the index.
        batch_loc = loc if loc in (None, ["body"]) else ["body", "events", 0, *loc[1:]]
        sends.append(("/v1/events:batch", b'{"events": [' + body + b"]}", batch_loc))
    else:
        sends.append(("/v1/events:batch", body, loc))
    for path, sent, expected_loc in sends:
        response = await client.post(path, content=sent, headers={**headers, "Idempotency-Key": f"k-{uuid.uuid4()}"})
        assert response.status_code == status, (path, response.status_code, response.text[:500])
        assert response.headers["Content-Type"] == "application/problem+json"
        answer = response.json()
        assert answer["status"] == status and answer["instance"] == path, answer
        if type_ is not None:
            errors = answer["errors"]
            assert errors[0]["type"] == type_ and errors[0]["loc"] == expected_loc, errors
    assert await outbox_count(engine) == 0
    # Nothing was left half-done: the producer's next valid event goes in.
    assert (await client.post("/v1/events", json=short_event("o-after"))).status_code == 202


@pytest.fixture
async def fuzz_client(make_client, add_producer):
    """One producer without a practical rate limit, shared by every generated example."""
    return make_client(await add_producer("fuzz", rate_limit=1_000_000))


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
@given(event_=HOSTILE_EVENTS, batch=st.booleans())
async def test_generated_hostile_bodies_never_get_a_5xx(fuzz_client, event_, batch):
    body = dump({"events": [event_]} if batch else event_).encode()
    response = await fuzz_client.post(
        "/v1/events:batch" if batch else "/v1/events", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code in REFUSALS | {202}, (response.status_code, body[:300], response.text[:300])
    answer = response.json()
    if response.status_code == 422:
        assert all(isinstance(e["loc"], list) and e["loc"][0] == "body" for e in answer["errors"]), answer


async def test_a_poisoned_request_among_many_valid_ones_fails_alone(make_app, add_producer, engine):
    """Two producers post 80 valid events at once with hostile ones in between.

    The edge refuses NUL, lone surrogates and huge integers before the shared commit;
    a row the database itself refuses (here a CHECK constraint the edge knows nothing
    of) fails only its own request, with 422: every valid neighbour is committed.
    """
    app = make_app()
    keys = {name: await add_producer(name) for name in ("erp", "crm")}
    table = OUTBOX.name
    async with engine.begin() as connection:
        await connection.execute(
            text(f"ALTER TABLE {table} ADD CONSTRAINT test_no_poison CHECK (correlation_id NOT LIKE 'poison%')")
        )
    poisoned = {
        "nul": raw_event('"o-\\u0000"'),
        "surrogate": raw_event('"o-\\udc80"'),
        "huge-int": raw_event(payload=with_amount("9" * 5000)),
        "refused-by-the-database": json.dumps(short_event("poison-1")).encode(),
    }
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingest") as client:

            async def post(producer: str, body: bytes, key: str) -> httpx.Response:
                headers = {"X-API-Key": keys[producer], "Content-Type": "application/json", "Idempotency-Key": key}
                return await client.post("/v1/events", content=body, headers=headers)

            valid = [(name, f"o-{name}-{n}") for n in range(40) for name in keys]
            calls = [post(name, json.dumps(short_event(order)).encode(), f"k-{order}") for name, order in valid]
            for index, (label, body) in enumerate(poisoned.items()):
                calls.insert(10 + 20 * index, post("erp" if index % 2 else "crm", body, f"k-poison-{label}"))
            responses = await asyncio.gather(*calls)
    finally:
        async with engine.begin() as connection:
            await connection.execute(text(f"ALTER TABLE {table} DROP CONSTRAINT test_no_poison"))
    by_key = {r.request.headers["Idempotency-Key"]: r for r in responses}
    for label in poisoned:
        refused = by_key[f"k-poison-{label}"]
        assert refused.status_code == 422, (label, refused.status_code, refused.text)
    assert by_key["k-poison-refused-by-the-database"].json()["errors"][0]["type"] == "database_refused"
    accepted = {order: by_key[f"k-{order}"] for _name, order in valid}
    assert {order: r.status_code for order, r in accepted.items() if r.status_code != 202} == {}
    rows = await outbox_rows(engine)
    assert sorted(r.message_id for r in rows) == sorted(r.json()["message_id"] for r in accepted.values())
    assert {decode(r.body).correlation_id for r in rows} == {order for _name, order in valid}


async def test_writer_commits_the_neighbours_of_rows_the_database_refuses(engine):
    """The backstop behind validation: a refused row fails its own write only; an outage fails all."""
    from contracts import OrderCancelled, new_message
    from outbox.uow import outbox_row
    from producers.ingest.writer import OutboxWriter, RowsRefused

    def rows(order_id: str) -> list[dict[str, Any]]:
        message = new_message(OrderCancelled(order_id=order_id, reason="x"), correlation_id=order_id, producer="erp")
        return [outbox_row(message, clock.now())]

    writer = OutboxWriter(engine, OUTBOX)
    nul, surrogate, too_long = rows("o-nul"), rows("o-surrogate"), rows("o-long")
    nul[0]["correlation_id"] = "o-\x00"
    surrogate[0]["correlation_id"] = "o-\udc80"
    too_long[0]["correlation_id"] = "o" * 65
    good = [rows(f"o-{n}") for n in range(6)]
    stream = io.StringIO()
    configure_logging("INFO", "json", stream=stream)
    try:
        # Gathered: all eight are pending before the first commit starts, so they share it.
        outcomes = await asyncio.gather(
            writer.write(good[0]),
            writer.write(nul),
            writer.write(good[1]),
            writer.write(good[2]),
            writer.write(surrogate),
            writer.write(good[3]),
            writer.write(too_long),
            writer.write(good[4] + good[5]),
            return_exceptions=True,
        )
    finally:
        configure_logging("INFO", "json")
    [split] = [json.loads(line) for line in stream.getvalue().splitlines() if "ingest.commit_split" in line]
    assert split["requests"] == 8
    failed = [type(o).__name__ if o is not None else None for o in outcomes]
    assert failed == [None, "RowsRefused", None, None, "RowsRefused", None, "RowsRefused", None]
    assert "SQLSTATE 22" in str(outcomes[1]) and str(outcomes[4]).isascii()
    assert sorted(r.message_id for r in await outbox_rows(engine)) == sorted(g[0]["message_id"] for g in good)
    # Alone in its commit, a refused request fails the same way.
    with pytest.raises(RowsRefused):
        await writer.write(nul)


async def test_client_disconnect_mid_body_is_one_log_line(make_app, add_producer):
    app = make_app()
    key = await add_producer("erp")
    stream = io.StringIO()
    configure_logging("INFO", "json", stream=stream)
    messages = [
        {"type": "http.request", "body": b'{"type": "order.created", "corr', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/events",
        "raw_path": b"/v1/events",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"ingest"),
            (b"content-type", b"application/json"),
            (b"x-api-key", key.encode()),
            (b"content-length", b"500"),
        ],
        "client": ("127.0.0.1", 5000),
        "server": ("ingest", 80),
    }
    try:
        await app(scope, receive, send)  # raises nothing: an unhandled error is what uvicorn logs with a traceback
    finally:
        configure_logging("INFO", "json")
    lines = [line for line in stream.getvalue().splitlines() if line.strip()]
    assert len(lines) == 1 and json.loads(lines[0])["event"] == "ingest.client_disconnected", lines
    assert "Traceback" not in stream.getvalue()
    assert sent[0]["status"] == 400


async def test_a_body_sent_too_slowly_is_408_and_frees_the_request(make_app, add_producer):
    app = make_app(body_timeout_seconds=0.3)
    key = await add_producer("erp")
    trickled = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if not trickled.is_set():
            trickled.set()
            return {"type": "http.request", "body": b'{"type": "order.', "more_body": True}
        await asyncio.Event().wait()  # a slow-loris client: the rest never comes
        raise AssertionError("unreachable")

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/events",
        "raw_path": b"/v1/events",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"ingest"), (b"content-type", b"application/json"), (b"x-api-key", key.encode())],
        "client": ("127.0.0.1", 5000),
        "server": ("ingest", 80),
    }
    await asyncio.wait_for(app(scope, receive, send), timeout=10)
    assert sent[0]["status"] == 408
    assert b"not received within 0.3s" in b"".join(m.get("body", b"") for m in sent[1:])


async def test_hostile_api_keys_are_401(make_client, add_producer, engine):
    await add_producer("erp")
    client = make_client()
    for presented in (
        b"cpk_" + b"a" * 8000 + b"_x",
        b"cpk_\xe9\xff_x",
        b"cpk_%00_x",
        b"cpk__",
        b"cpk_a_\xff" * 100,
        b"\xff" * 64,
    ):
        response = await client.post("/v1/events", json=short_event(), headers=[(b"X-API-Key", presented)])
        assert response.status_code == 401, (presented[:20], response.status_code)
        response = await client.post("/v1/events", json=short_event(), headers=[(b"Authorization", b"Bearer " + presented)])
        assert response.status_code == 401, (presented[:20], response.status_code)
    assert await outbox_count(engine) == 0
