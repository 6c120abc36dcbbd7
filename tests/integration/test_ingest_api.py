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

import httpx
import pytest
import structlog
from sqlalchemy import select

from contracts import decode
from infra.logging import configure_logging
from producers.ingest.tables import ingest_producers
from tests.integration.ingest_helpers import (  # noqa: F401 - fixtures
    add_producer,
    engine,
    make_app,
    make_client,
    order_created,
    outbox_count,
    outbox_rows,
    redis,
    short_event,
)

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
        **short_event("o-2"), "message_id": str(message_id), "version": 1, "occurred_at": occurred.isoformat(),
        "producer": "erp", "causation_id": None, "traceparent": None,
    }
    response = await client.post("/v1/events", json=envelope)
    assert response.status_code == 202, response.text
    assert response.json()["message_id"] == str(message_id)
    [row] = await outbox_rows(engine)
    assert decode(row.body).envelope.occurred_at == occurred
    # A different producer name in the envelope is refused, naming the field.
    response = await client.post("/v1/events", json={**envelope, "message_id": str(uuid.uuid4()), "producer": "someone-else"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "producer"]


@pytest.mark.parametrize(
    ("body", "loc", "fragment"),
    [
        ({"type": "order.created", "payload": order_created()}, ["body", "correlation_id"], "Field required"),
        (short_event(payload=order_created(total={"amount": 3000, "currency": "euro"})), ["body", "payload", "total", "currency"], "pattern"),
        (short_event(payload={**order_created(), "lines": []}), ["body", "payload", "lines"], "at least 1"),
        (short_event(type="order.shipped"), ["body", "type"], "unknown message type"),
        (short_event(version=7), ["body", "version"], "unknown version"),
        (short_event(type="stock.reserve"), ["body", "type"], "command"),
        ({**short_event(), "colour": "red"}, ["body", "colour"], "Extra inputs"),
        ([short_event()], ["body"], "valid dictionary"),
    ],
    ids=["missing-correlation-id", "bad-currency", "no-lines", "unknown-type", "unknown-version", "command", "extra-field", "not-an-object"],
)
async def test_invalid_body_is_422_naming_the_field(make_client, add_producer, engine, body, loc, fragment):
    client = make_client(await add_producer("erp", ("order.created", "order.cancelled")))
    response = await client.post("/v1/events", json=body)
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert any(e["loc"] == loc and fragment in e["msg"] for e in errors), errors
    assert await outbox_count(engine) == 0


async def test_invalid_json_is_422(make_client, add_producer, engine):
    client = make_client(await add_producer("erp"))
    response = await client.post("/v1/events", content=b'{"type": ', headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body"] and "invalid JSON" in response.json()["detail"][0]["msg"]


async def test_batch_is_all_or_nothing(make_client, add_producer, engine):
    client = make_client(await add_producer("erp"))
    events = [short_event(f"o-{n}") for n in range(3)]
    bad = [events[0], short_event("o-x", payload=order_created(total={"amount": 1, "currency": "EUR"})), events[2]]
    response = await client.post("/v1/events:batch", json={"events": bad})
    assert response.status_code == 422
    assert {tuple(e["loc"][:4]) for e in response.json()["detail"]} == {("body", "events", 1, "payload")}
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
    third = await other.post("/v1/events", json=short_event("o-1"), headers=headers)
    assert third.status_code == 202 and third.json() != first.json()
    assert await outbox_count(engine) == 2


async def test_same_key_with_another_body_is_422(make_client, add_producer, engine):
    client = make_client(await add_producer("erp"))
    headers = {"Idempotency-Key": "k-1"}
    assert (await client.post("/v1/events", json=short_event("o-1"), headers=headers)).status_code == 202
    response = await client.post("/v1/events", json=short_event("o-2"), headers=headers)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]
    assert response.json()["detail"][0]["type"] == "idempotency_key_reused"
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
    responses = await asyncio.gather(
        *(client.post("/v1/events", json=short_event("o-race"), headers=headers) for _ in range(20))
    )
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
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingest", headers={"X-API-Key": key}) as client:
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
    assert (await make_client(key).post("/v1/events", json=short_event("o-9"))).status_code == 401
    assert await outbox_count(engine) == 1


async def test_disallowed_type_is_403(make_client, add_producer, engine):
    client = make_client(await add_producer("erp", ("order.cancelled",)))
    response = await client.post("/v1/events", json=short_event())
    assert response.status_code == 403
    assert "order.created" in response.json()["detail"] and "order.cancelled" in response.json()["detail"]
    batch = {"events": [{"type": "order.cancelled", "correlation_id": "o-1", "payload": {"order_id": "o-1", "reason": "x"}}, short_event()]}
    assert (await client.post("/v1/events:batch", json=batch)).status_code == 403
    assert await outbox_count(engine) == 0


async def test_over_the_rate_limit_is_429_with_retry_after(make_client, add_producer, engine):
    # A long window: three requests practically never straddle a window boundary.
    limited = make_client(await add_producer("erp", rate_limit=3), rate_window_seconds=3600)
    statuses = [(await limited.post("/v1/events", json=short_event(f"o-{n}"))).status_code for n in range(3)]
    assert statuses == [202, 202, 202]
    response = await limited.post("/v1/events", json=short_event("o-4"))
    assert response.status_code == 429
    assert 1 <= int(response.headers["Retry-After"]) <= 3600
    # The limit is per producer: another one is not affected.
    other = make_client(await add_producer("crm", rate_limit=3), rate_window_seconds=3600)
    assert (await other.post("/v1/events", json=short_event("o-5"))).status_code == 202
    assert await outbox_count(engine) == 4


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


async def test_redis_down_is_503_nothing_accepted_and_health_says_why(make_client, add_producer, engine, redis_server):
    client = make_client(await add_producer("erp"))
    assert (await client.get("/health")).status_code == 200
    redis_server.stop()
    try:
        for headers in ({"Idempotency-Key": "k-down"}, {}):
            response = await client.post("/v1/events", json=short_event(), headers=headers)
            assert response.status_code == 503, response.text
            assert "Redis" in response.json()["detail"] and response.headers["Retry-After"].isdigit()
        health = await client.get("/health")
        assert health.status_code == 503
        checks = health.json()["checks"]
        assert checks["database"]["ok"] is True
        assert checks["redis"]["ok"] is False and "503" in checks["redis"]["effect"] and checks["redis"]["error"]
        assert await outbox_count(engine) == 0
    finally:
        redis_server.start()
    response = await client.post("/v1/events", json=short_event(), headers={"Idempotency-Key": "k-down"})
    assert response.status_code == 202
    assert (await client.get("/health")).status_code == 200


async def test_contracts_and_openapi_are_served(make_client):
    client = make_client()
    contracts = (await client.get("/v1/contracts")).json()
    assert contracts["order.created.v1"]["properties"]["payload"]["title"] == "OrderCreated"
    openapi = (await client.get("/openapi.json")).json()
    assert {"/v1/events", "/v1/events:batch", "/v1/contracts", "/health"} <= set(openapi["paths"])
    post = openapi["paths"]["/v1/events"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/EventIn"
    assert "EventIn" in openapi["components"]["schemas"] and "BatchIn" in openapi["components"]["schemas"]
    assert {"202", "401", "403", "409", "413", "422", "429", "503"} <= set(post["responses"])
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


async def test_health_reports_both_dependencies(make_client):
    response = await make_client().get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {"database": {"ok": True}, "redis": {"ok": True}}}


async def test_writer_commits_a_request_larger_than_one_statement_in_one_transaction(engine):
    """Rows past `max_rows` go in several statements of one transaction; duplicates are skipped."""
    from contracts import OrderCancelled, new_message
    from outbox.uow import outbox_row
    from producers.ingest.writer import OutboxWriter
    from tests.integration.ingest_helpers import OUTBOX, clock

    writer = OutboxWriter(engine, OUTBOX, max_rows=2)
    rows = [
        outbox_row(new_message(OrderCancelled(order_id=f"o-{n}", reason="x"), correlation_id=f"o-{n}", producer="erp"), clock.now())
        for n in range(5)
    ]
    await asyncio.gather(writer.write(rows), writer.write(rows[:1]), writer.write([rows[4]]))
    assert sorted(r.message_id for r in await outbox_rows(engine)) == sorted(r["message_id"] for r in rows)


async def test_database_down_is_503_nothing_accepted_and_the_key_is_free_again(engine, redis):
    """The API reaches PostgreSQL through a link the test cuts: what a client sees when it is down."""
    from sqlalchemy.engine import make_url

    from infra.db import create_engine
    from producers.ingest import IngestConfig, ProducerDirectory, create_app, generate_key
    from tests.integration.ingest_helpers import clock
    from tests.support import CuttableLink

    url = make_url(engine.url.render_as_string(hide_password=False))
    link = await CuttableLink(url.host or "127.0.0.1", url.port or 5432).start()
    linked = create_engine(url.set(host="127.0.0.1", port=link.port).render_as_string(hide_password=False))
    # A key from the keys file: authenticating it needs no database.
    key, record = generate_key("erp", ("order.created",), rate_limit=None, now=clock.now())
    app = create_app(
        engine=linked, redis=redis, producers=ProducerDirectory(None, [record]),
        config=IngestConfig(redis_prefix=f"test:{uuid.uuid4().hex[:8]}:"), clock=clock,
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
        health = await client.get("/health")
        assert health.status_code == 503
        checks = health.json()["checks"]
        assert checks["database"]["ok"] is False and checks["database"]["error"]
        assert checks["redis"]["ok"] is True
        assert await outbox_count(engine) == 1
        await link.restore()
        # The refused request left its key free: the retry is accepted once.
        retried = await client.post("/v1/events", json=event, headers={"Idempotency-Key": "k-db"})
        assert retried.status_code == 202, retried.text
        again = await client.post("/v1/events", json=event, headers={"Idempotency-Key": "k-db"})
        assert again.status_code == 202 and again.json() == retried.json()
        assert await outbox_count(engine) == 2
        assert (await client.get("/health")).status_code == 200
    finally:
        await client.aclose()
        await linked.dispose()
        await link.close()
