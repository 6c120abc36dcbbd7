"""Hostile input at the contract edge: every defect is a ContractError naming it, never a crash."""

import contextlib
import json
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts import MAX_MESSAGE_BYTES, ContractError, decode, new_message
from contracts.messages import MAX_AMOUNT, CommitStock, OrderCreated


def envelope(payload=None, **fields):
    raw = {
        "message_id": str(uuid.uuid4()),
        "type": "stock.reserve",
        "version": 1,
        "occurred_at": "2026-01-01T00:00:00+00:00",
        "correlation_id": "o-1",
        "producer": "test",
        "payload": payload if payload is not None else {"order_id": "o-1", "lines": [{"sku": "A", "quantity": 1}]},
    }
    raw.update(fields)
    return raw


def order_created(**payload):
    fields = {
        "order_id": "o-1",
        "customer_id": "c-1",
        "lines": [{"sku": "A", "quantity": 2, "unit_price": 150}],
        "total": {"amount": 300, "currency": "EUR"},
        "payment_token": "tok_ok_1",
    }
    fields.update(payload)
    return envelope(fields, type="order.created")


def dumps(raw) -> bytes:
    return json.dumps(raw).encode()


HOSTILE = {
    "nested 10,000 deep": b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
    "integer of 5,000 digits": b'{"version": ' + b"9" * 5_000 + b"}",
    "over the size limit": b'{"pad": "' + b"x" * MAX_MESSAGE_BYTES + b'"}',
    "not UTF-8": b'{"type": "\xff\xfe"}',
    "quantity as a string": dumps(envelope({"order_id": "o-1", "lines": [{"sku": "A", "quantity": "2"}]})),
    "quantity as a boolean": dumps(envelope({"order_id": "o-1", "lines": [{"sku": "A", "quantity": True}]})),
    "version as a string": dumps(envelope(version="1")),
    "version past 2**31": dumps(envelope(version=2**31)),
    "amount past int64": dumps(order_created(total={"amount": 2**63, "currency": "EUR"})),
    "amount past the bound": dumps(
        order_created(
            lines=[{"sku": "A", "quantity": 1, "unit_price": MAX_AMOUNT + 1}], total={"amount": MAX_AMOUNT + 1, "currency": "EUR"}
        )
    ),
    "NUL in the correlation id": dumps(envelope(correlation_id="o-1\u0000")),
    "NUL in the order id": dumps(
        envelope({"order_id": "o\u00001", "lines": [{"sku": "A", "quantity": 1}]}, correlation_id="o\u00001")
    ),
    "newline in a sku": dumps(envelope({"order_id": "o-1", "lines": [{"sku": "A\nB", "quantity": 1}]})),
    "lone surrogate in a sku": (
        b'{"message_id": "%s", "type": "stock.reserve", "version": 1, "occurred_at": "2026-01-01T00:00:00+00:00", '
        b'"correlation_id": "o-1", "producer": "t", "payload": {"order_id": "o-1", "lines": [{"sku": "\\ud800", "quantity": 1}]}}'
    )
    % str(uuid.uuid4()).encode(),
    "correlation id of another order": dumps(envelope(correlation_id="o-2")),
    "malformed traceparent": dumps(envelope(traceparent="00-zz")),
    "occurred_at as epoch seconds": dumps(envelope(occurred_at=0)),
    "occurred_at as a digit string": dumps(envelope(occurred_at="1700000000")),
    "type with markup": dumps(envelope(type="[/]stock.reserve")),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_bodies_are_contract_errors(name: str) -> None:
    with pytest.raises(ContractError):
        decode(HOSTILE[name])


def test_a_message_belongs_to_the_saga_of_its_order() -> None:
    with pytest.raises(ContractError, match=r"correlation_id 'o-2' != payload.order_id 'o-1'"):
        decode(dumps(envelope(correlation_id="o-2")))
    with pytest.raises(ContractError, match="belongs to the saga of its order_id"):
        new_message(CommitStock(order_id="o-1"), correlation_id="o-2", producer="saga")


def test_a_valid_order_still_decodes() -> None:
    message = decode(dumps(order_created()))
    assert isinstance(message.payload, OrderCreated)
    assert message.payload.total.amount == 300


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["order_id", "lines", "total", "customer_id", "payment_token"]), json_values)
def test_any_json_in_any_order_field_decodes_or_is_a_contract_error(field: str, value: object) -> None:
    with contextlib.suppress(ContractError):
        decode(dumps(order_created(**{field: value})))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_bytes_decode_or_are_a_contract_error(raw: bytes) -> None:
    with contextlib.suppress(ContractError):
        decode(raw)
