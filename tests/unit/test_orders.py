"""Orders: placement with its event in one transaction, status following the saga."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from consumers.orders import HANDLERS, SERVICE, OrderStatus, get_order, order_statuses, place_order, rules
from contracts import BusinessRuleError, ContractError, Money, OrderLine, Payload, TransientError, new_message
from contracts.messages import OrderCancelled, OrderCompleted, OrderCreated, OrderRejected
from infra.clock import VirtualClock
from infra.db import create_engine
from outbox.tables import metadata, tables_for
from outbox.uow import UnitOfWork

LINES = [OrderLine(sku="apple", quantity=2, unit_price=150), OrderLine(sku="pear", quantity=1, unit_price=99)]


@pytest.mark.parametrize("current", list(OrderStatus))
@pytest.mark.parametrize("outcome", [OrderStatus.COMPLETED, OrderStatus.CANCELLED, OrderStatus.REJECTED])
def test_only_a_pending_order_takes_an_outcome(current: OrderStatus, outcome: OrderStatus) -> None:
    expected = outcome if current is OrderStatus.PENDING else None
    assert rules.next_status(current, outcome) is expected


def test_the_total_sums_quantity_times_price() -> None:
    assert rules.total_of(LINES, "EUR") == Money(amount=399, currency="EUR")
    assert rules.total_of([], "EUR") == Money(amount=0, currency="EUR")


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'orders.db'}")
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    yield engine
    await engine.dispose()


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


async def place(engine: AsyncEngine, clock: VirtualClock, **overrides: object) -> str:
    arguments: dict[str, object] = {
        "order_id": "o1",
        "customer_id": "c1",
        "lines": LINES,
        "currency": "EUR",
        "payment_token": "tok_visa",
    }
    return await place_order(engine, clock, **(arguments | overrides))  # type: ignore[arg-type]


async def outbox_bodies(engine: AsyncEngine) -> list[dict]:  # type: ignore[type-arg]
    outbox = tables_for(SERVICE).outbox
    async with engine.connect() as connection:
        rows = (await connection.execute(select(outbox.c.body).order_by(outbox.c.id))).all()
    return [json.loads(row.body) for row in rows]


async def test_placing_an_order_writes_it_and_announces_it_in_a_trace(
    engine: AsyncEngine, clock: VirtualClock, spans: InMemorySpanExporter
) -> None:
    spans.clear()
    assert await place(engine, clock) == "o1"

    order = await get_order(engine, "o1")
    assert order is not None
    assert (order.status, order.total, order.lines) == (
        OrderStatus.PENDING,
        Money(amount=399, currency="EUR"),
        tuple(LINES),
    )
    [created] = await outbox_bodies(engine)
    assert (created["type"], created["correlation_id"]) == ("order.created", "o1")
    assert created["payload"]["total"] == {"amount": 399, "currency": "EUR"}
    assert created["payload"]["payment_token"] == "tok_visa"
    [span] = [s for s in spans.get_finished_spans() if s.name == "order.place"]
    assert created["traceparent"].split("-")[1] == format(span.context.trace_id, "032x")


async def test_placing_the_same_order_again_announces_nothing(engine: AsyncEngine, clock: VirtualClock) -> None:
    await place(engine, clock)

    assert await place(engine, clock) == "o1"
    assert len(await outbox_bodies(engine)) == 1


async def test_placing_another_order_under_a_taken_id_is_refused(engine: AsyncEngine, clock: VirtualClock) -> None:
    await place(engine, clock)

    with pytest.raises(BusinessRuleError, match="different contents"):
        await place(engine, clock, lines=LINES[:1])
    assert len(await outbox_bodies(engine)) == 1


async def test_an_order_without_an_id_gets_one(engine: AsyncEngine, clock: VirtualClock) -> None:
    order_id = await place(engine, clock, order_id=None)

    assert len(order_id) == 36
    assert await order_statuses(engine) == {order_id: "pending"}


async def test_an_invalid_order_is_refused_before_anything_is_written(engine: AsyncEngine, clock: VirtualClock) -> None:
    with pytest.raises(ContractError, match="lines"):
        await place(engine, clock, lines=[])
    with pytest.raises(ContractError, match="currency"):
        await place(engine, clock, currency="euro")
    assert await order_statuses(engine) == {}


async def settle(engine: AsyncEngine, clock: VirtualClock, payload: Payload) -> None:
    message = new_message(payload, correlation_id=payload.order_id, producer="saga")  # type: ignore[attr-defined]
    async with UnitOfWork(engine, SERVICE, clock, incoming=message) as uow:
        await HANDLERS[payload.message_type](uow, message)
        assert uow.pending == ()
        await uow.commit()


async def test_the_first_outcome_settles_the_order(engine: AsyncEngine, clock: VirtualClock) -> None:
    await place(engine, clock)
    await place(engine, clock, order_id="o2")
    await place(engine, clock, order_id="o3")

    await settle(engine, clock, OrderCompleted(order_id="o1", total=Money(amount=399, currency="EUR")))
    await settle(engine, clock, OrderCancelled(order_id="o2", reason="payment declined"))
    await settle(engine, clock, OrderRejected(order_id="o3", reason="out of stock"))

    assert await order_statuses(engine) == {"o1": "completed", "o2": "cancelled", "o3": "rejected"}
    assert (await get_order(engine, "o2")).reason == "payment declined"  # type: ignore[union-attr]


async def test_a_repeated_or_conflicting_outcome_changes_nothing(engine: AsyncEngine, clock: VirtualClock) -> None:
    await place(engine, clock)
    await settle(engine, clock, OrderCancelled(order_id="o1", reason="payment declined"))

    await settle(engine, clock, OrderCancelled(order_id="o1", reason="commit deadline"))
    await settle(engine, clock, OrderCompleted(order_id="o1", total=Money(amount=399, currency="EUR")))

    order = await get_order(engine, "o1")
    assert order is not None and (order.status, order.reason) == (OrderStatus.CANCELLED, "payment declined")


async def test_an_outcome_for_an_unknown_order_waits_for_the_order(engine: AsyncEngine, clock: VirtualClock) -> None:
    # Transient: the order.created that records the order may still be on its way.
    with pytest.raises(TransientError, match="unknown order"):
        await settle(engine, clock, OrderRejected(order_id="o9", reason="out of stock"))


def _created(order_id: str = "o1", lines: list[OrderLine] = LINES) -> OrderCreated:
    return OrderCreated(
        order_id=order_id,
        customer_id="c1",
        lines=tuple(lines),
        total=rules.total_of(lines, "EUR"),
        payment_token="tok_visa",
    )


async def test_an_order_that_entered_elsewhere_is_recorded_pending(engine: AsyncEngine, clock: VirtualClock) -> None:
    await settle(engine, clock, _created("o7"))

    assert await order_statuses(engine) == {"o7": "pending"}
    await settle(engine, clock, OrderCompleted(order_id="o7", total=Money(amount=399, currency="EUR")))
    assert await order_statuses(engine) == {"o7": "completed"}


async def test_the_announcement_of_a_placed_order_changes_nothing(engine: AsyncEngine, clock: VirtualClock) -> None:
    await place(engine, clock)
    await settle(engine, clock, OrderCompleted(order_id="o1", total=Money(amount=399, currency="EUR")))

    await settle(engine, clock, _created("o1"))

    assert await order_statuses(engine) == {"o1": "completed"}


async def test_another_order_under_a_taken_id_is_refused_on_the_broker(engine: AsyncEngine, clock: VirtualClock) -> None:
    await place(engine, clock)

    with pytest.raises(BusinessRuleError, match="different contents"):
        await settle(engine, clock, _created("o1", LINES[:1]))
    order = await get_order(engine, "o1")
    assert order is not None and order.lines == tuple(LINES)
