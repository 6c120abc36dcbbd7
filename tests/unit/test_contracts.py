import json
import uuid

import jsonschema
import pytest

from contracts import REGISTRY, ContractError, decode, encode, new_message
from contracts.export import asyncapi, json_schemas
from contracts.messages import COMMANDS, EVENTS, ChargePayment, Money, OrderCreated, OrderLine, ReserveStock, StockLine
from infra import topology as t


def order_created(**overrides):
    fields = {
        "order_id": "o-1",
        "customer_id": "c-1",
        "lines": [OrderLine(sku="A", quantity=2, unit_price=150)],
        "total": Money(amount=300, currency="EUR"),
        "payment_token": "tok_ok_1",
    }
    fields.update(overrides)
    return OrderCreated(**fields)


def body(message_type="stock.reserve", version=1, payload=None, **envelope):
    raw = {
        "message_id": str(uuid.uuid4()),
        "type": message_type,
        "version": version,
        "occurred_at": "2026-01-01T00:00:00+00:00",
        "correlation_id": "o-1",
        "producer": "test",
        "payload": payload if payload is not None else {"order_id": "o-1", "lines": [{"sku": "A", "quantity": 1}]},
    }
    raw.update(envelope)
    return json.dumps(raw).encode()


def test_round_trip_keeps_every_field():
    message = new_message(order_created(), correlation_id="o-1", producer="orders")
    decoded = decode(encode(message.envelope))
    assert decoded.envelope == message.envelope
    assert decoded.payload == message.payload


def test_catalogue_is_complete_and_named_by_tense():
    assert {m.message_type for m in EVENTS} == {
        "order.created",
        "stock.reserved",
        "stock.reservation_failed",
        "payment.authorized",
        "payment.declined",
        "stock.committed",
        "stock.commit_failed",
        "stock.released",
        "payment.refunded",
        "ledger.updated",
        "order.completed",
        "order.cancelled",
        "order.rejected",
    }
    assert {m.message_type for m in COMMANDS} == {
        "stock.reserve",
        "stock.commit",
        "stock.release",
        "payment.charge",
        "payment.refund",
    }
    assert all(m.kind == "event" for m in EVENTS) and all(m.kind == "command" for m in COMMANDS)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (body("stock.explode"), "unknown message type 'stock.explode'"),
        (body(version=7), "unknown version 7 of 'stock.reserve' (known: [1])"),
        (
            body(payload={"order_id": "o-1", "lines": []}),
            "invalid payload for stock.reserve v1: lines: Tuple should have at least 1 item",
        ),
        (body(payload={"order_id": "o-1", "lines": [{"sku": "A", "quantity": -1}]}), "lines.0.quantity"),
        (body(message_id="nope"), "invalid envelope: message_id"),
        (body(occurred_at="2026-01-01T00:00:00"), "occurred_at"),
    ],
)
def test_decode_names_exactly_what_is_wrong(raw, expected):
    with pytest.raises(ContractError) as caught:
        decode(raw)
    assert expected in str(caught.value)


def test_money_is_integer_minor_units_with_iso_currency():
    with pytest.raises(ValueError):
        Money(amount=1.5, currency="EUR")
    with pytest.raises(ValueError):
        Money(amount=100, currency="euro")
    with pytest.raises(ValueError, match=r"total.amount 301 != sum of lines 300"):
        order_created(total=Money(amount=301, currency="EUR"))


def test_no_card_number_field_exists_anywhere():
    for model in REGISTRY:
        assert not {"card_number", "pan", "cvv"} & set(model.model_fields), model


def test_exported_schemas_accept_real_messages_and_reject_bad_ones():
    schemas = json_schemas()
    assert set(schemas) == {f"{m.message_type}.v1" for m in REGISTRY}
    good = new_message(ReserveStock(order_id="o", lines=[StockLine(sku="A", quantity=1)]), correlation_id="o", producer="t")
    jsonschema.validate(json.loads(encode(good.envelope)), schemas["stock.reserve.v1"])
    bad = json.loads(encode(good.envelope))
    bad["payload"]["lines"] = []
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schemas["stock.reserve.v1"])
    charge = new_message(
        ChargePayment(order_id="o", amount=Money(amount=5, currency="EUR"), payment_token="t"), correlation_id="o", producer="t"
    )
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(encode(charge.envelope)), schemas["stock.reserve.v1"])


def test_asyncapi_lists_every_message_and_queue():
    document = asyncapi(t.amqp_topology([500, 1000]))
    assert document["asyncapi"] == "3.0.0"
    assert len(document["components"]["messages"]) == 2 * len(list(REGISTRY))  # each, and its dead-lettered copy
    receives = [op for op in document["operations"].values() if op["action"] == "receive"]
    assert len(receives) == 2 * len(t.WORK_QUEUES)  # each work queue's consumer, each DLQ's archiver
    consumed = [ref for name, op in document["operations"].items() if name.startswith("consume.") for ref in op["messages"]]
    assert len(consumed) == sum(len(q.routing_keys) for q in t.WORK_QUEUES)
    assert document["channels"]["compensa.commands"]["bindings"]["amqp"]["exchange"]["name"] == "compensa.commands"
