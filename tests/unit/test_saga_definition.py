"""Saga definitions: the order saga as data, and the checks every definition passes."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest

from contracts.messages import (
    ChargePayment,
    CommitStock,
    Money,
    OrderCancelled,
    OrderCompleted,
    OrderCreated,
    OrderLine,
    OrderRejected,
    PaymentAuthorized,
    PaymentDeclined,
    PaymentRefunded,
    RefundPayment,
    ReleaseStock,
    ReserveStock,
    StockLine,
    StockReleased,
    StockReserved,
)
from sagas import ORDER_SAGA, Compensation

ORDER = OrderCreated(
    order_id="o-7",
    customer_id="c-7",
    lines=(OrderLine(sku="kiwi", quantity=3, unit_price=100),),
    total=Money(amount=300, currency="USD"),
    payment_token="tok_7",
)
DATA = ORDER_SAGA.initial_data(ORDER)


def test_order_saga_steps_and_deadlines() -> None:
    assert [s.name for s in ORDER_SAGA.steps] == ["reserve", "charge", "commit"]
    assert all(s.deadline == timedelta(seconds=30) for s in ORDER_SAGA.steps)
    assert ORDER_SAGA.compensation_deadline == timedelta(seconds=30)
    assert ORDER_SAGA.max_compensation_attempts == 5
    assert [s.compensation and s.compensation.command_type for s in ORDER_SAGA.steps] == [
        "stock.release",
        "payment.refund",
        "stock.release",
    ]


def test_order_saga_data_is_json_able_and_builds_every_command() -> None:
    assert DATA == {
        "order_id": "o-7",
        "customer_id": "c-7",
        "lines": [{"sku": "kiwi", "quantity": 3, "unit_price": 100}],
        "total": {"amount": 300, "currency": "USD"},
        "payment_token": "tok_7",
    }
    reserve, charge, commit = ORDER_SAGA.steps
    assert reserve.command_for(DATA) == ReserveStock(order_id="o-7", lines=(StockLine(sku="kiwi", quantity=3),))
    assert charge.command_for(DATA) == ChargePayment(
        order_id="o-7", amount=Money(amount=300, currency="USD"), payment_token="tok_7"
    )
    assert commit.command_for(DATA) == CommitStock(order_id="o-7")
    assert ORDER_SAGA.compensation_for("stock.release").command_for(DATA) == ReleaseStock(order_id="o-7")
    assert ORDER_SAGA.compensation_for("payment.refund").command_for(DATA) == RefundPayment(order_id="o-7")


def test_order_saga_outcomes() -> None:
    assert ORDER_SAGA.completed(DATA) == OrderCompleted(order_id="o-7", total=Money(amount=300, currency="USD"))
    assert ORDER_SAGA.cancelled(DATA, "why") == OrderCancelled(order_id="o-7", reason="why")
    assert ORDER_SAGA.rejected(DATA, "why") == OrderRejected(order_id="o-7", reason="why")


def test_charge_success_records_the_payment_id() -> None:
    charge = ORDER_SAGA.steps[1]
    reply = PaymentAuthorized(order_id="o-7", payment_id="pay-9", amount=Money(amount=300, currency="USD"))
    assert charge.data_after(DATA, reply) == {**DATA, "payment_id": "pay-9"}


def test_handled_types_are_the_queue_bindings_of_the_saga() -> None:
    assert ORDER_SAGA.handled_types() == {
        "order.created",
        "stock.reserved",
        "stock.reservation_failed",
        "payment.authorized",
        "payment.declined",
        "stock.committed",
        "stock.commit_failed",
        "stock.released",
        "payment.refunded",
    }


def test_lookups_by_message_type() -> None:
    assert ORDER_SAGA.step_replying_with("payment.declined") is ORDER_SAGA.steps[1]
    assert ORDER_SAGA.step_replying_with("stock.released") is None
    compensation = ORDER_SAGA.compensation_confirmed_by("payment.refunded")
    assert compensation is not None and compensation.command is RefundPayment
    assert ORDER_SAGA.compensation_confirmed_by("stock.reserved") is None
    with pytest.raises(KeyError):
        ORDER_SAGA.compensation_for("payment.charge")


def test_a_builder_returning_the_wrong_command_fails_loudly() -> None:
    step = replace(ORDER_SAGA.steps[2], build=lambda data: ReleaseStock(order_id=data["order_id"]))
    with pytest.raises(TypeError, match="must build CommitStock, got ReleaseStock"):
        step.command_for(DATA)


# ---------------------------------------------------------------- refused definitions

RESERVE, CHARGE, COMMIT = ORDER_SAGA.steps


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"steps": ()}, "has no steps"),
        ({"max_compensation_attempts": 0}, "at least 1"),
        ({"steps": (RESERVE, replace(CHARGE, name="reserve"))}, "duplicate step names"),
        (
            {"steps": (RESERVE, replace(CHARGE, success=StockReserved))},
            "'stock.reserved' is both a reply of step 'reserve'",
        ),
        ({"starts_with": PaymentDeclined}, "'payment.declined' is both the start message"),
        (
            {"steps": (RESERVE, replace(CHARGE, failures=(PaymentDeclined, StockReleased)))},
            "'stock.released' confirms a compensation and is also a reply",
        ),
        (
            {
                "steps": (
                    RESERVE,
                    replace(
                        CHARGE,
                        compensation=Compensation(ReleaseStock, RESERVE.compensation.build, PaymentRefunded),
                    ),  # type: ignore[union-attr]
                )
            },
            "'stock.release' is confirmed by two different events",
        ),
        (
            {
                "steps": (
                    RESERVE,
                    replace(
                        CHARGE,
                        compensation=Compensation(RefundPayment, CHARGE.compensation.build, StockReleased),
                    ),  # type: ignore[union-attr]
                )
            },
            "'stock.released' confirms two different compensations",
        ),
    ],
)
def test_ambiguous_definitions_are_refused(changes: dict[str, object], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        replace(ORDER_SAGA, **changes)


def test_a_step_without_compensation_is_allowed() -> None:
    definition = replace(ORDER_SAGA, steps=(replace(RESERVE, compensation=None), CHARGE))
    assert "stock.released" not in definition.handled_types()
    assert "payment.refunded" in definition.handled_types()
