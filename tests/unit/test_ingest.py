"""Pure parts of the ingest: API keys, request fingerprints, derived ids, submissions, hostile bodies, SDK retries."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts import ContractError, LedgerUpdated, Posting, json_depth
from outbox.uow import outbox_row
from producers.ingest.auth import ProducerDirectory, check_types, generate_key, split_key
from producers.ingest.idempotency import fingerprint, message_ids
from producers.ingest.submission import SubmissionRejected, build_messages, json_media_type, parse_events, parse_json
from producers.sdk import IdempotencyKeyReused, IngestClient, IngestUnavailable, InvalidEvent, PermissionDenied, event
from tests.support import HOSTILE_EVENTS, dump, short_event

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def ledger(order_id: str = "o-1") -> LedgerUpdated:
    return LedgerUpdated(
        order_id=order_id,
        transaction_id=f"t-{order_id}",
        postings=(Posting(account="a", debit=5, credit=0), Posting(account="b", debit=0, credit=5)),
        balances={},
    )


def test_a_key_verifies_only_with_its_secret_and_is_stored_without_it():
    key, record = generate_key("erp", ["order.created"], now=NOW)
    key_id, secret = split_key(key)
    assert key_id == record.key_id and record.verify(secret) and not record.verify(secret + "x")
    assert secret not in json.dumps(record.to_json())
    assert split_key("cpk_only") is None and split_key("xyz_a_b") is None


def test_types_must_be_known_events():
    assert check_types(["order.created", " order.created", "order.cancelled"]) == ("order.cancelled", "order.created")
    with pytest.raises(ContractError, match="unknown"):
        check_types(["order.shipped"])
    with pytest.raises(ContractError, match="commands"):
        check_types(["stock.reserve"])
    with pytest.raises(ContractError, match="name"):
        generate_key("bad name!", ["order.created"])


async def test_directory_authenticates_configured_keys():
    key, record = generate_key("erp", ["order.created"])
    directory = ProducerDirectory(configured=[record])
    producer = await directory.authenticate(key)
    assert producer is not None and producer.name == "erp" and producer.may_publish("order.created")
    assert await directory.authenticate(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert await directory.authenticate(None) is None and await directory.authenticate("cpk_nope_x") is None


def test_fingerprint_ignores_formatting_but_not_content_or_endpoint():
    a = fingerprint("POST", "/v1/events", json.loads('{"a": 1, "b": [1, 2]}'))
    assert a == fingerprint("POST", "/v1/events", {"b": [1, 2], "a": 1})
    assert a != fingerprint("POST", "/v1/events", {"a": 2, "b": [1, 2]})
    assert a != fingerprint("POST", "/v1/events:batch", {"a": 1, "b": [1, 2]})


def test_derived_ids_are_stable_per_request_and_distinct_otherwise():
    ids = message_ids("erp", "k", "h", 3)
    assert ids == message_ids("erp", "k", "h", 3) and len(set(ids)) == 3
    assert not set(ids) & set(
        message_ids("crm", "k", "h", 3) + message_ids("erp", "k2", "h", 3) + message_ids("erp", "k", "h2", 3)
    )


def producer(types=("ledger.updated",)):
    _key, record = generate_key("erp", types)
    return record.producer()


def test_build_fills_server_fields_and_takes_the_traceparent_header():
    [item] = parse_events(
        {"type": "ledger.updated", "correlation_id": "o-1", "payload": ledger().model_dump(mode="json")},
        batch=False,
        max_events=10,
    )
    fixed = uuid.uuid4()
    trace = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    [message] = build_messages([item], batch=False, producer=producer(), now=NOW, ids=lambda _i: fixed, traceparent=trace)
    envelope = message.envelope
    assert (envelope.message_id, envelope.producer, envelope.occurred_at, envelope.version, envelope.traceparent) == (
        fixed,
        "erp",
        NOW,
        1,
        trace,
    )
    [message] = build_messages([item], batch=False, producer=producer(), now=NOW, ids=lambda _i: fixed, traceparent="garbage")
    assert message.envelope.traceparent is None


def test_forbidden_types_win_over_payload_errors_and_batches_name_the_index():
    body = {
        "events": [
            {"type": "ledger.updated", "correlation_id": "o-1", "payload": {}},
            {"type": "order.created", "correlation_id": "o-1", "payload": {}},
        ]
    }
    events = parse_events(body, batch=True, max_events=10)
    with pytest.raises(SubmissionRejected) as forbidden:
        build_messages(events, batch=True, producer=producer(), now=NOW, ids=lambda _i: uuid.uuid4())
    assert forbidden.value.status == 403
    with pytest.raises(SubmissionRejected) as invalid:
        build_messages(events[:1], batch=True, producer=producer(), now=NOW, ids=lambda _i: uuid.uuid4())
    assert invalid.value.status == 422
    assert ["body", "events", 0, "payload", "transaction_id"] in [e["loc"] for e in invalid.value.detail]
    with pytest.raises(SubmissionRejected) as too_many:
        parse_events({"events": body["events"] * 3}, batch=True, max_events=5)
    assert too_many.value.detail[0]["loc"] == ["body", "events"]


def fake_server(*answers: httpx.Response) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    """An HTTP peer answering in turn (a fake of the API, for the client's retry rules only)."""
    seen: list[httpx.Request] = []
    queue = list(answers)

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return queue.pop(0)

    return httpx.MockTransport(handle), seen


def test_sdk_retries_transient_answers_under_one_key_with_backoff():
    ok = httpx.Response(202, json={"message_ids": [str(uuid.uuid4())]})
    transport, seen = fake_server(httpx.Response(503, headers={"Retry-After": "2"}), httpx.Response(409), ok)
    slept: list[float] = []
    with IngestClient("http://api", "k", transport=transport, sleep=slept.append, backoff_base=0.1) as client:
        accepted = client.publish(ledger(), correlation_id="o-1")
    assert accepted.attempts == 3 and len(seen) == 3
    assert {r.headers["Idempotency-Key"] for r in seen} == {accepted.idempotency_key}
    assert len({r.content for r in seen}) == 1
    assert slept[0] == 2.0 and 0 <= slept[1] <= 0.2


def test_sdk_raises_clear_errors_without_retrying_4xx_and_gives_up_on_5xx():
    detail = [{"loc": ["body", "payload", "order_id"], "msg": "Field required", "type": "missing"}]
    problem = {"type": "urn:compensa:problem:invalid-request", "title": "Invalid request", "status": 422}
    transport, seen = fake_server(
        httpx.Response(422, json={**problem, "detail": "body.payload.order_id: Field required", "errors": detail}),
        httpx.Response(403, json={"type": "urn:compensa:problem:forbidden-event-type", "detail": "no"}),
        httpx.Response(
            422,
            json={
                "type": "urn:compensa:problem:idempotency-key-reused",
                "detail": "used",
                "errors": [{"loc": ["header", "Idempotency-Key"], "msg": "used", "type": "idempotency_key_reused"}],
            },
        ),
    )
    with IngestClient("http://api", "k", transport=transport, sleep=lambda _s: None) as client:
        with pytest.raises(InvalidEvent, match=r"body\.payload\.order_id: Field required"):
            client.publish({"x": 1}, type="ledger.updated", correlation_id="o-1")
        with pytest.raises(PermissionDenied, match="403: no"):
            client.publish(ledger(), correlation_id="o-1")
        with pytest.raises(IdempotencyKeyReused):
            client.publish(ledger(), correlation_id="o-1")
    assert len(seen) == 3
    transport, seen = fake_server(*(httpx.Response(503) for _ in range(3)))
    with (
        IngestClient("http://api", "k", transport=transport, sleep=lambda _s: None, max_attempts=3) as client,
        pytest.raises(IngestUnavailable, match="3 attempts"),
    ):
        client.publish(ledger(), correlation_id="o-1")


def test_event_builder_short_form():
    assert event(ledger(), correlation_id="o-1")["type"] == "ledger.updated"
    assert event({"a": 1}, type="x.y", version=2, correlation_id="c") == {
        "type": "x.y",
        "payload": {"a": 1},
        "version": 2,
        "correlation_id": "c",
    }
    with pytest.raises(ValueError, match="type="):
        event({"a": 1}, correlation_id="c")


# ---------------------------------------------------------------- hostile bodies


def refusal(raw: bytes) -> tuple[list[Any], str]:
    with pytest.raises(SubmissionRejected) as refused:
        parse_json(raw, max_depth=32)
    assert refused.value.status == 422
    first = refused.value.detail[0]
    return first["loc"], first["type"]


@pytest.mark.parametrize(
    ("raw", "loc", "type_"),
    [
        (b"[" * 100_000 + b"]" * 100_000, ["body"], "json_too_deep"),
        (b'{"a":' * 33 + b"1" + b"}" * 33, ["body"], "json_too_deep"),
        (b'{"a": "' + b"[" * 100 + b'"}', None, None),  # brackets in a string are text
        (rb'{"a": "\\"}', None, None),
        (b'{"amount": ' + b"9" * 5000 + b"}", ["body", "amount"], "int_out_of_range"),
        (b'{"x": [0, -9223372036854775809]}', ["body", "x", 1], "int_out_of_range"),
        (b'{"x": [0, -9223372036854775808, 9223372036854775807]}', None, None),
        (b'{"x": 1e400}', ["body", "x"], "number_not_finite"),
        (b'{"x": -Infinity}', ["body", "x"], "number_not_finite"),
        (rb'{"correlation_id": "\ud800"}', ["body", "correlation_id"], "string_unicode"),
        (rb'{"note": "\ud83d\ude00"}', None, None),  # a surrogate pair is one character
        (rb'{"note": "\udc00\ud800"}', ["body", "note"], "string_unicode"),  # reversed: two lone halves
        (rb'{"\udfff": 1}', ["body", r"\udfff"], "string_unicode"),
        (rb'{"note": "a\u0000"}', ["body", "note"], "string_nul"),
        (rb'{"\u0000": 1}', ["body", "\x00"], "string_nul"),
        (rb'{"correlation_id": "a\tb"}', ["body", "correlation_id"], "string_control_character"),
        (b'{"order_id": "a\x7f"}', ["body", "order_id"], "string_control_character"),
        (rb'{"payment_token": "tok\u001b"}', ["body", "payment_token"], "string_control_character"),
        (rb'{"reason": "line one\nline two\t\u001b"}', None, None),  # free text: only NUL is refused
        (rb'{"a\nb": 1}', ["body", "a\nb"], "string_control_character"),
        (rb'{"a": "\\u0000"}', None, None),  # an escaped backslash, then text
        (b'{"type": "x"', ["body"], "json_invalid"),
        (b'{"a": "\xff"}', ["body"], "json_invalid"),
        (b"", ["body"], "json_invalid"),
    ],
)
def test_parse_json_refuses_what_no_field_may_hold_and_names_it(raw, loc, type_):
    if loc is None:
        assert parse_json(raw, max_depth=32) == json.loads(raw)
    else:
        assert refusal(raw) == (loc, type_)


def test_the_depth_limit_counts_levels_of_arrays_and_objects():
    assert parse_json(b"[" * 32 + b"]" * 32, max_depth=32) is not None
    assert refusal(b"[" * 33 + b"]" * 33)[1] == "json_too_deep"


nested = st.recursive(
    st.one_of(st.integers(), st.text(st.sampled_from('[]{}"\\ax\n')), st.none()),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(st.sampled_from('[]{}"\\a'), max_size=3), children, max_size=3)
    ),
    max_leaves=30,
)


def real_depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(real_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(real_depth, value), default=0)
    return 0


@given(nested, st.booleans())
def test_json_depth_is_exact_for_valid_json(value, ascii_only):
    assert json_depth(json.dumps(value, ensure_ascii=ascii_only).encode()) == real_depth(value)


@pytest.mark.parametrize(
    "raw",
    [b"[" * 1_048_576, b"[]" * 524_288, b'\\"' * 349_525, b'"' + b"\\" * 524_287, b'"\\"' * 262_144 + b"\\", b'{"a":' * 209_715],
    ids=["opening", "pairs", "escaped-quotes", "backslashes", "unterminated", "objects"],
)
def test_hostile_megabyte_is_refused_in_linear_time(raw):
    started = time.perf_counter()
    with pytest.raises(SubmissionRejected):
        parse_json(raw, max_depth=32)
    assert time.perf_counter() - started < 2.0


@pytest.mark.parametrize(
    ("content_type", "ok"),
    [
        ("application/json", True),
        ("Application/JSON; charset=UTF-8", True),
        ('application/json; charset="utf-8"', True),
        ("application/vnd.compensa+json", True),
        ("text/plain", False),
        ("text/json", False),
        ("", False),
        (None, False),
        ("application/json; charset=iso-8859-1", False),
        ("application/jsonp", False),
        ("multipart/form-data; boundary=x", False),
    ],
)
def test_only_json_in_utf_8_is_accepted(content_type, ok):
    assert json_media_type(content_type) is ok


@settings(max_examples=300, deadline=None)
@given(st.one_of(HOSTILE_EVENTS, HOSTILE_EVENTS.map(lambda event_: {"events": [event_, short_event("o-2")]})))
def test_hostile_bodies_become_messages_or_a_rejection_never_an_error(body):
    """The whole pure path (parse, shape, contracts, outbox row) raises nothing but SubmissionRejected."""
    raw = dump(body).encode()
    batch = isinstance(body, dict) and "events" in body
    try:
        parsed = parse_json(raw, max_depth=32)
        fingerprint("POST", "/v1/events", parsed)
        events = parse_events(parsed, batch=batch, max_events=10)
        messages = build_messages(
            events, batch=batch, producer=producer(("order.created",)), now=NOW, ids=lambda _i: uuid.uuid4()
        )
    except SubmissionRejected as rejected:
        assert rejected.status in (403, 422)
        json.dumps(rejected.detail, ensure_ascii=True)
        return
    for message in messages:
        row = outbox_row(message, NOW)
        for value in row.values():
            if isinstance(value, str):
                assert "\x00" not in value
                value.encode("utf-8")  # no lone surrogate reaches the database


# ---------------------------------------------------------------- the OpenAPI document


def openapi_document(**config: Any) -> dict[str, Any]:
    """The document the app serves (building the app opens no connection)."""
    from redis.asyncio import Redis
    from sqlalchemy.ext.asyncio import create_async_engine

    from producers.ingest import IngestConfig, create_app

    app = create_app(
        engine=create_async_engine("sqlite+aiosqlite://"),
        redis=Redis(),
        producers=ProducerDirectory(),
        config=IngestConfig(**config),
    )
    return app.openapi()


def test_the_openapi_document_gives_every_event_its_payload_schema():
    from openapi_spec_validator import validate

    from contracts import EVENTS, REGISTRY
    from contracts.export import payload_schemas

    document = openapi_document(max_batch_events=7)
    validate(document)
    schemas = document["components"]["schemas"]
    ref = "#/components/schemas/"
    event_in = schemas["EventIn"]
    types = {model.message_type for model in EVENTS}
    assert event_in["discriminator"]["propertyName"] == "type"
    assert set(event_in["discriminator"]["mapping"]) == types  # events only: a command is a 422
    assert [variant["$ref"] for variant in event_in["oneOf"]] == [ref + f"EventIn.{t}" for t in sorted(types)]
    assert "correlation_id` equals `payload.order_id" in event_in["description"]
    for model in EVENTS:
        variant = schemas[f"EventIn.{model.message_type}"]
        assert variant["properties"]["type"]["const"] == model.message_type
        assert variant["properties"]["payload"] == {"$ref": ref + f"{model.message_type}.v{model.message_version}"}
        assert set(variant["required"]) == {"type", "correlation_id", "payload"} and variant["additionalProperties"] is False
    for name, schema in payload_schemas(REGISTRY, kind="event", ref_prefix=ref).items():
        assert schemas[name] == schema
    assert not any(name.startswith(("stock.reserve.", "payment.charge.")) for name in schemas)
    batch = schemas["BatchIn"]["properties"]["events"]
    assert batch["items"] == {"$ref": ref + "EventIn"} and (batch["minItems"], batch["maxItems"]) == (1, 7)
    # A mapping's keys carry the pattern the model enforces.
    ledger = schemas["ledger.updated.v1"]["properties"]
    assert ledger["balances"]["propertyNames"]["pattern"] == ledger["order_id"]["pattern"]  # both identifiers


def test_every_documented_answer_has_a_schema_and_every_error_is_a_problem():
    document = openapi_document()
    problem = {"$ref": "#/components/schemas/Problem"}
    assert set(document["components"]["schemas"]["Problem"]["required"]) == {"type", "title", "status", "detail", "instance"}
    for path in ("/v1/events", "/v1/events:batch"):
        operation = document["paths"][path]["post"]
        responses = operation["responses"]
        assert set(responses) == {"202", "400", "401", "403", "408", "409", "413", "415", "422", "429", "500", "503"}
        assert responses["202"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Accepted"}
        for status, answer in responses.items():
            if status != "202":
                assert answer["content"] == {"application/problem+json": {"schema": problem}}, status
        required = {
            status: {name for name, header in answer.get("headers", {}).items() if header["required"]}
            for status, answer in responses.items()
        }
        assert required["202"] == required["403"] == required["409"] == {"RateLimit", "RateLimit-Policy"}
        assert required["429"] == {"Retry-After", "RateLimit", "RateLimit-Policy"}
        assert required["401"] == {"WWW-Authenticate"} and required["503"] == {"Retry-After"}
        # An absent header is not a null one.
        assert all("anyOf" not in parameter["schema"] for parameter in operation["parameters"])
        assert not next(p for p in operation["parameters"] if p["name"] == "Idempotency-Key").get("required")
    for path in ("/livez", "/readyz", "/health"):
        answers = document["paths"][path]["get"]["responses"]
        assert answers["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Health"}
        assert answers["500"]["content"] == {"application/problem+json": {"schema": problem}}
    for path in ("/readyz", "/health"):
        assert document["paths"][path]["get"]["responses"]["503"]["headers"]["Retry-After"]["required"]
    assert "503" not in document["paths"]["/livez"]["get"]["responses"]
    # A server that requires the key says so in its document.
    strict = openapi_document(require_idempotency_key=True)["paths"]["/v1/events"]["post"]["parameters"]
    assert next(p for p in strict if p["name"] == "Idempotency-Key")["required"] is True


def test_rate_limit_fields_follow_the_draft():
    from producers.ingest.app import rate_headers
    from producers.ingest.idempotency import RateLimit

    fields = rate_headers(RateLimit(limit=600, window_seconds=60, remaining=0, reset_seconds=7))
    assert fields == {"RateLimit": '"default";r=0;t=7', "RateLimit-Policy": '"default";q=600;w=60'}


def test_problem_details_carry_type_title_status_detail_and_instance():
    from producers.ingest.problems import PROBLEM_TYPES, problem

    response = problem(429, "slow down \udc80", path="/v1/events:batch", name="rate-limited", headers={"Retry-After": "3"})
    assert response.media_type == "application/problem+json" and response.headers["Retry-After"] == "3"
    assert json.loads(response.body) == {
        "type": "urn:compensa:problem:rate-limited",
        "title": "Rate limit exceeded",
        "status": 429,
        "detail": "slow down \udc80",
        "instance": "/v1/events:batch",
    }
    assert response.body.isascii()
    plain = json.loads(problem(404, "Not Found", path="/no such/\u00e9").body)
    assert (plain["type"], plain["title"], plain["instance"]) == ("about:blank", "Not Found", "/no%20such/%C3%A9")
    with pytest.raises(ValueError, match="is a 429"):
        problem(400, "x", path="/", name="rate-limited")
    assert all(400 <= status < 600 for status, _title in PROBLEM_TYPES.values())


@pytest.mark.parametrize(
    ("field", "value", "accepted"),
    [
        ("version", 1, True),
        ("version", "1", False),
        ("version", True, False),
        ("version", 1.0, False),
        ("occurred_at", "2026-01-02T03:04:05Z", True),
        ("occurred_at", "2026-01-02T03:04:05.123+02:00", True),
        ("occurred_at", 0, False),
        ("occurred_at", "1700000000", False),
        ("occurred_at", "2026-01-02T03:04:05", False),
        ("occurred_at", "2026-01-02 03:04:05Z", False),
        ("occurred_at", "2026-01-02", False),
    ],
)
def test_event_fields_are_taken_as_documented_without_coercion(field, value, accepted):
    body = {"type": "ledger.updated", "correlation_id": "o-1", "payload": ledger().model_dump(mode="json"), field: value}
    try:
        parse_events(body, batch=False, max_events=10)
    except SubmissionRejected as rejected:
        assert not accepted and rejected.detail[0]["loc"] == ["body", field]
    else:
        assert accepted
