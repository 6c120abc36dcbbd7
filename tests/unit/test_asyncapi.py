"""The AsyncAPI document `compensa contracts export` writes, checked by the official parser and by real messages.

- ``@asyncapi/parser`` (npm, installed by tests/harness/asyncapi.py when missing) reports no
  error-severity diagnostic on the exported document;
- every message's payload and headers schemas accept what the code produces (an envelope
  from ``new_message``, the outbox row's headers, the retry and dead-letter headers of a
  delivery), and refuse a wrong message type;
- every exchange, work queue, delay queue and DLQ of infra/topology.py is a channel, and
  the correlation id points at the envelope's ``correlation_id``;
- the HTML page names every channel and message and loads nothing from anywhere.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

from contracts import messages as m
from contracts.asyncapi_html import render_html
from contracts.envelope import REGISTRY, encode, new_message
from contracts.export import CORRELATION_ID_LOCATION, asyncapi, dead_letter_key, message_key, schema_name
from infra import topology as t
from infra.settings import Settings
from infra.transport.base import Delivery
from outbox.uow import outbox_row
from tests.harness import asyncapi as parser
from tests.unit.support import cli

SETTINGS = Settings()
DELAYS = t.retry_delays_ms(SETTINGS.max_attempts, SETTINGS.retry_base_seconds, SETTINGS.retry_max_seconds)
DOCUMENT_URI = "urn:compensa:asyncapi"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

_MONEY = {"amount": 3000, "currency": "EUR"}
_LINES = [{"sku": "SKU-001", "quantity": 2}]
#: One valid payload of every message type (order id o-1).
SAMPLES: dict[type[m.Payload], dict[str, Any]] = {
    m.OrderCreated: {
        "customer_id": "c-1",
        "lines": [{"sku": "SKU-001", "quantity": 2, "unit_price": 1500}],
        "total": _MONEY,
        "payment_token": "tok_ok_1",
    },
    m.StockReserved: {"lines": _LINES},
    m.StockReservationFailed: {"reason": "out of stock: SKU-001"},
    m.PaymentAuthorized: {"payment_id": "p-1", "amount": _MONEY},
    m.PaymentDeclined: {"reason": "declined"},
    m.StockCommitted: {},
    m.StockCommitFailed: {"reason": "reservation expired"},
    m.StockReleased: {"lines": _LINES},
    m.PaymentRefunded: {"amount": _MONEY},
    m.LedgerUpdated: {
        "transaction_id": "capture:o-1",
        "postings": [
            {"account": "customer", "debit": 3000, "credit": 0},
            {"account": "revenue", "debit": 0, "credit": 3000},
        ],
        "balances": {"customer": 3000, "revenue": -3000},
    },
    m.OrderCompleted: {"total": _MONEY},
    m.OrderCancelled: {"reason": "payment declined"},
    m.OrderRejected: {"reason": "out of stock"},
    m.ReserveStock: {"lines": _LINES},
    m.CommitStock: {},
    m.ReleaseStock: {},
    m.ChargePayment: {"amount": _MONEY, "payment_token": "tok_ok_1"},
    m.RefundPayment: {},
}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return asyncapi(t.amqp_topology(DELAYS, SETTINGS.queue_type))


def _validator(document: Mapping[str, Any], pointer: str) -> jsonschema.Draft7Validator:
    """A validator of the schema at `pointer` whose `#/components/...` references resolve in the document."""
    registry = Registry().with_resource(DOCUMENT_URI, Resource.from_contents(document, default_specification=DRAFT7))
    return jsonschema.Draft7Validator({"$ref": f"{DOCUMENT_URI}#{pointer}"}, registry=registry)


def _errors(validator: jsonschema.Draft7Validator, instance: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(instance)]


def _real_message(model: type[m.Payload]) -> tuple[dict[str, Any], dict[str, Any]]:
    """An envelope as the code encodes it and the headers its outbox row carries."""
    message = new_message(model.model_validate({"order_id": "o-1", **SAMPLES[model]}), correlation_id="o-1", producer="test")
    message = new_message(
        message.payload, correlation_id="o-1", producer="test", traceparent=TRACEPARENT, causation_id=uuid.uuid4()
    )
    row = outbox_row(message, datetime.now(UTC))
    return json.loads(encode(message.envelope)), json.loads(row["headers"])


class _Delivery(Delivery):
    """A delivery from a work queue: only its (real) header builders are used here."""

    def __init__(self, queue: t.QueueSpec, headers: dict[str, Any], routing_key: str) -> None:
        self.queue = queue
        self.headers = headers
        self.body = b""
        self.message_id = None
        self.correlation_id = None
        self.exchange = queue.exchange.name
        self.routing_key = routing_key
        self.redelivered = False

    async def ack(self) -> None:
        raise NotImplementedError

    async def retry(self, delay_ms: int, expiration_ms: int, headers: Mapping[str, Any]) -> None:
        raise NotImplementedError

    async def dead_letter(self, headers: Mapping[str, Any]) -> None:
        raise NotImplementedError


def test_every_message_type_has_a_sample() -> None:
    assert set(SAMPLES) == set(REGISTRY)


def test_the_official_parser_reports_no_error(document: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "asyncapi.json"
    path.write_text(json.dumps(document))
    version, diagnostics = parser.parse(path)
    assert version == parser.PARSER_VERSION
    errors = [d for d in diagnostics if d["severity"] == "error"]
    for diagnostic in diagnostics:
        print(
            f"{diagnostic['severity']}: {diagnostic['code']}: {diagnostic['message']} at {'/'.join(map(str, diagnostic['path']))}"
        )
    assert not errors, f"{len(errors)} error(s) from @asyncapi/parser {version}, first: {errors[0]}"
    # Warnings too: none today, and a new one is worth a look.
    assert not [d for d in diagnostics if d["severity"] == "warning"]


def test_the_parser_does_report_a_broken_document(tmp_path: Path) -> None:
    """The check above can fail: a message binding holding deliveryMode is an error."""
    broken = asyncapi(t.amqp_topology(DELAYS))
    key = message_key(m.OrderCreated)
    broken["components"]["messages"][key]["bindings"]["amqp"]["deliveryMode"] = 2
    broken["components"]["messages"][key]["payload"] = {"$ref": "#/$defs/Nowhere"}
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    _, diagnostics = parser.parse(path)
    assert [d for d in diagnostics if d["severity"] == "error"]


@pytest.mark.parametrize("model", list(REGISTRY), ids=schema_name)
def test_each_message_schema_accepts_what_the_code_sends(document: dict[str, Any], model: type[m.Payload]) -> None:
    envelope, headers = _real_message(model)
    messages = document["components"]["messages"]
    key = message_key(model)
    assert messages[key]["name"] == model.message_type
    payload = _validator(document, f"/components/messages/{key}/payload")
    assert _errors(payload, envelope) == []
    assert headers == {"traceparent": TRACEPARENT}
    assert _errors(_validator(document, f"/components/messages/{key}/headers"), headers) == []
    # The schema is the contract of this type: another type's envelope is refused.
    other = next(o for o in REGISTRY if o is not model)
    assert _errors(payload, _real_message(other)[0])

    # A retried copy and a dead letter carry what the consumer's delivery adds.
    queue = next((q for q in t.WORK_QUEUES if model.message_type in q.routing_keys), None)
    if queue is None:
        assert model is m.LedgerUpdated  # no queue consumes it: never retried or dead-lettered
        return
    now = datetime.now(UTC)
    delivery = _Delivery(queue, headers, model.message_type)
    retried = delivery.retry_headers("transient", "database timeout", now)
    assert _errors(_validator(document, f"/components/messages/{key}/headers"), retried) == []
    dead = _Delivery(queue, retried, model.message_type).dead_letter_headers("contract", "bad payload", now, "o-1")
    dead_headers = _validator(document, f"/components/messages/{dead_letter_key(model)}/headers")
    assert _errors(dead_headers, dead) == []
    assert _errors(dead_headers, headers), "a message without the dead-letter headers passed as a dead letter"


def test_correlation_id_points_at_the_envelopes_correlation_id(document: dict[str, Any]) -> None:
    envelope, _ = _real_message(m.ReserveStock)
    location = document["components"]["correlationIds"]["sagaId"]["location"]
    assert location == CORRELATION_ID_LOCATION == "$message.payload#/correlation_id"
    pointer = location.split("#", 1)[1]
    value: Any = envelope
    for part in pointer.strip("/").split("/"):
        value = value[part]
    assert value == "o-1" == envelope["correlation_id"]
    for message in document["components"]["messages"].values():
        assert message["correlationId"] == {"$ref": "#/components/correlationIds/sagaId"}


def test_every_exchange_and_queue_of_the_topology_is_a_channel(document: dict[str, Any]) -> None:
    channels = document["channels"]
    exchanges = {
        c["bindings"]["amqp"]["exchange"]["name"] for c in channels.values() if c["bindings"]["amqp"]["is"] == "routingKey"
    }
    queues = {c["bindings"]["amqp"]["queue"]["name"] for c in channels.values() if c["bindings"]["amqp"]["is"] == "queue"}
    assert exchanges == {exchange.name for exchange in t.EXCHANGES}
    expected = {q.name for q in t.WORK_QUEUES} | {q.name for q in t.DEAD_LETTER_QUEUES}
    expected |= {q.delay_queue(ms) for q in t.WORK_QUEUES for ms in DELAYS}
    assert queues == expected and len(DELAYS) == SETTINGS.max_attempts - 1
    for queue in t.WORK_QUEUES:
        work = channels[queue.name]
        assert work["address"] == queue.name
        assert {m["$ref"].rsplit("/", 1)[1] for m in work["messages"].values()} == {
            message_key(REGISTRY.model_for(k, 1)) for k in queue.routing_keys
        }
        assert work["x-compensa-queue-arguments"]["x-dead-letter-exchange"] == t.DLX.name
        for ms in DELAYS:
            arguments = channels[queue.delay_queue(ms)]["x-compensa-queue-arguments"]
            assert arguments["x-message-ttl"] == ms and arguments["x-dead-letter-routing-key"] == queue.name
        assert f"consume.{queue.name}" in document["operations"]
        assert f"dead_letter.{queue.name}" in document["operations"]
    events = channels[t.EVENTS.name]
    assert set(events["parameters"]["routingKey"]["enum"]) == {m.message_type for m in REGISTRY if m.kind == "event"}


def test_bindings_sit_where_asyncapi_puts_them(document: dict[str, Any]) -> None:
    for message in document["components"]["messages"].values():
        assert set(message["bindings"]["amqp"]) <= {"contentEncoding", "messageType", "bindingVersion"}
    publishes = [op for name, op in document["operations"].items() if name.startswith("publish.")]
    assert len(publishes) == len(list(REGISTRY))
    for operation in document["operations"].values():
        amqp = operation["bindings"]["amqp"]
        if operation["action"] == "send":
            assert amqp["deliveryMode"] == 2 and "ack" not in amqp
        else:
            assert amqp["ack"] is True
    assert not [ref for ref in _refs(document) if not ref.startswith(("#/components/", "#/channels/"))]


def _refs(value: Any) -> list[str]:
    if isinstance(value, dict):
        own = [value["$ref"]] if "$ref" in value else []
        return own + [r for v in value.values() for r in _refs(v)]
    if isinstance(value, list):
        return [r for v in value for r in _refs(v)]
    return []


def test_export_writes_json_and_an_html_page_naming_every_channel_and_message(env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "contracts"
    result = cli("contracts", "export", "--out", str(out))
    assert result.exit_code == 0, result.stderr
    written = json.loads((out / "asyncapi.json").read_text())
    assert written["asyncapi"] == "3.0.0" and written["channels"].keys() == asyncapi(t.amqp_topology(DELAYS))["channels"].keys()
    page = (out / "asyncapi.html").read_text()
    assert page == render_html(written)
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page.lower()
    assert "http://" not in page and "https://" not in page, "the page must load nothing from elsewhere"
    for key, channel in written["channels"].items():
        assert f'id="channel-{key}"' in page and channel["address"] in page
    for key, message in written["components"]["messages"].items():
        assert f'id="message-{key}"' in page and message["name"] in page
    for name in written["operations"]:
        assert f'id="operation-{name}"' in page
    for header in t.HEADER_SCHEMAS:
        assert f"<code>{header}</code>" in page
    for server in written["servers"].values():
        assert server["host"] in page


def test_html_escapes_what_the_document_says() -> None:
    document = {"asyncapi": "3.0.0", "info": {"title": "<b>x</b>", "version": "1"}, "channels": {}}
    document["channels"]["c"] = {"address": "<script>alert(1)</script>", "messages": {}}
    page = render_html(document)
    assert "<script>" not in page and "&lt;script&gt;" in page and "<b>x</b>" not in page
