"""The order saga: reserve stock -> charge payment -> commit stock, as data.

```
order.created ─► stock.reserve ─► stock.reserved ─► payment.charge ─► payment.authorized
   ─► stock.commit ─► stock.committed ─► order.completed
stock.reservation_failed                     ─► order.rejected    (nothing to undo)
payment.declined / charge deadline           ─► stock.release ─► order.cancelled
stock.commit_failed / commit deadline        ─► payment.refund + stock.release ─► order.cancelled
```
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from contracts.messages import (
    ChargePayment,
    CommitStock,
    Money,
    OrderCancelled,
    OrderCompleted,
    OrderCreated,
    OrderRejected,
    Payload,
    PaymentAuthorized,
    PaymentDeclined,
    PaymentRefunded,
    RefundPayment,
    ReleaseStock,
    ReserveStock,
    StockCommitFailed,
    StockCommitted,
    StockLine,
    StockReleased,
    StockReservationFailed,
    StockReserved,
    clip_text,
)
from sagas.definition import Compensation, SagaData, SagaDefinition, Step

STEP_DEADLINE = timedelta(seconds=30)


def _initial_data(order: Payload) -> SagaData:
    assert isinstance(order, OrderCreated)
    return order.model_dump(mode="json")


def _reserve(data: SagaData) -> ReserveStock:
    lines = tuple(StockLine(sku=line["sku"], quantity=line["quantity"]) for line in data["lines"])
    return ReserveStock(order_id=data["order_id"], lines=lines)


def _charge(data: SagaData) -> ChargePayment:
    return ChargePayment(
        order_id=data["order_id"],
        amount=Money.model_validate(data["total"]),
        payment_token=data["payment_token"],
    )


def _record_payment(data: SagaData, reply: Payload) -> SagaData:
    assert isinstance(reply, PaymentAuthorized)
    return {**data, "payment_id": reply.payment_id}


# Compensations carry only the order id: participants find what to undo by it, and
# a timed-out step must be undoable without ever having seen its reply.
RELEASE_STOCK = Compensation(
    command=ReleaseStock,
    build=lambda data: ReleaseStock(order_id=data["order_id"]),
    confirmed_by=StockReleased,
)
REFUND_PAYMENT = Compensation(
    command=RefundPayment,
    build=lambda data: RefundPayment(order_id=data["order_id"]),
    confirmed_by=PaymentRefunded,
)

ORDER_SAGA = SagaDefinition(
    name="order",
    starts_with=OrderCreated,
    initial_data=_initial_data,
    steps=(
        Step(
            name="reserve",
            command=ReserveStock,
            build=_reserve,
            success=StockReserved,
            failures=(StockReservationFailed,),
            deadline=STEP_DEADLINE,
            compensation=RELEASE_STOCK,
        ),
        Step(
            name="charge",
            command=ChargePayment,
            build=_charge,
            success=PaymentAuthorized,
            failures=(PaymentDeclined,),
            deadline=STEP_DEADLINE,
            compensation=REFUND_PAYMENT,
            on_success=_record_payment,
        ),
        Step(
            name="commit",
            command=CommitStock,
            build=lambda data: CommitStock(order_id=data["order_id"]),
            success=StockCommitted,
            failures=(StockCommitFailed,),
            deadline=STEP_DEADLINE,
            # Releasing after a commit returns the sold units to stock.
            compensation=RELEASE_STOCK,
        ),
    ),
    completed=lambda data: OrderCompleted(order_id=data["order_id"], total=Money.model_validate(data["total"])),
    # A reason gathers a reply's reason, an operator's words, a prefix: cut to what a message carries.
    cancelled=lambda data, reason: OrderCancelled(order_id=data["order_id"], reason=clip_text(reason)),
    rejected=lambda data, reason: OrderRejected(order_id=data["order_id"], reason=clip_text(reason)),
    compensation_deadline=timedelta(seconds=30),
    max_compensation_attempts=5,
)


def order_saga(
    *,
    step_deadline: timedelta = STEP_DEADLINE,
    compensation_deadline: timedelta = timedelta(seconds=30),
    max_compensation_attempts: int = 5,
) -> SagaDefinition:
    """The order saga with other timings (tests and deployments tune these, not the steps)."""
    return replace(
        ORDER_SAGA,
        steps=tuple(replace(step, deadline=step_deadline) for step in ORDER_SAGA.steps),
        compensation_deadline=compensation_deadline,
        max_compensation_attempts=max_compensation_attempts,
    )
