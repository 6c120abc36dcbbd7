"""Stock handlers on SQLite: idempotency by order, expiry, conservation, the pipeline."""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from consumers.stock import (
    HANDLERS,
    SERVICE,
    committed_stock,
    expire_reservations,
    make_handlers,
    reservation_statuses,
    seed_stock,
    stock_levels,
)
from contracts import ConflictError, Payload, StockLine, encode, new_message
from contracts.messages import (
    CommitStock,
    ReleaseStock,
    ReserveStock,
    StockCommitFailed,
    StockCommitted,
    StockReleased,
    StockReservationFailed,
    StockReserved,
)
from contracts.routing import exchange_for
from infra.clock import VirtualClock
from infra.db import create_engine
from infra.pipeline import MessageProcessor
from infra.topology import STOCK_COMMANDS
from infra.transport.memory import MemoryBroker
from outbox.ports import OutgoingMessage
from outbox.tables import metadata, tables_for
from outbox.uow import UnitOfWork


async def new_engine(path: Path) -> AsyncEngine:
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    return engine


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = await new_engine(tmp_path / "stock.db")
    await seed_stock(engine, {"apple": 10, "pear": 3})
    yield engine
    await engine.dispose()


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


async def handle(
    engine: AsyncEngine, clock: VirtualClock, payload: Payload, handlers: dict[str, Any] = HANDLERS
) -> list[Payload]:
    """Run one command through its handler in a unit of work; return what it sent."""
    message = new_message(payload, correlation_id=payload.order_id, producer="saga")  # type: ignore[attr-defined]
    async with UnitOfWork(engine, SERVICE, clock, incoming=message) as uow:
        await handlers[payload.message_type](uow, message)
        sent = [m.payload for m in uow.pending]
        await uow.commit()
    return sent


def reserve(order_id: str = "o1", **quantities: int) -> ReserveStock:
    wanted = quantities or {"apple": 2}
    return ReserveStock(order_id=order_id, lines=tuple(StockLine(sku=s, quantity=q) for s, q in wanted.items()))


async def test_reserve_moves_stock_from_on_hand_to_reserved(engine: AsyncEngine, clock: VirtualClock) -> None:
    sent = await handle(engine, clock, reserve(apple=2, pear=3))

    assert sent == [StockReserved(order_id="o1", lines=reserve(apple=2, pear=3).lines)]
    assert await stock_levels(engine) == {"apple": (8, 2), "pear": (0, 3)}


async def test_a_refused_reserve_changes_nothing_and_repeats_its_reason(engine: AsyncEngine, clock: VirtualClock) -> None:
    first = await handle(engine, clock, reserve(apple=2, pear=4))
    await seed_stock(engine, {"pear": 50})
    again = await handle(engine, clock, reserve(apple=2, pear=4))

    reason = "insufficient stock for SKU 'pear': requested 4, available 3, short by 1"
    assert first == again == [StockReservationFailed(order_id="o1", reason=reason)]
    assert await stock_levels(engine) == {"apple": (10, 0), "pear": (50, 0)}


async def test_a_repeated_reserve_holds_stock_once(engine: AsyncEngine, clock: VirtualClock) -> None:
    await handle(engine, clock, reserve())
    sent = await handle(engine, clock, reserve())

    assert sent == [StockReserved(order_id="o1", lines=reserve().lines)]
    assert await stock_levels(engine) == {"apple": (8, 2), "pear": (3, 0)}


async def test_release_twice_returns_stock_once(engine: AsyncEngine, clock: VirtualClock) -> None:
    await handle(engine, clock, reserve())
    first = await handle(engine, clock, ReleaseStock(order_id="o1"))
    second = await handle(engine, clock, ReleaseStock(order_id="o1"))

    assert first == [StockReleased(order_id="o1", lines=reserve().lines)]
    assert second == [StockReleased(order_id="o1")]
    assert await stock_levels(engine) == {"apple": (10, 0), "pear": (3, 0)}


async def test_release_before_reserve_voids_the_order(engine: AsyncEngine, clock: VirtualClock) -> None:
    released = await handle(engine, clock, ReleaseStock(order_id="o1"))
    late = await handle(engine, clock, reserve())

    assert released == [StockReleased(order_id="o1")]
    assert late == [StockReservationFailed(order_id="o1", reason="order voided")]
    assert await reservation_statuses(engine) == {"o1": "voided"}
    assert await stock_levels(engine) == {"apple": (10, 0), "pear": (3, 0)}


async def test_reserve_after_release_fails(engine: AsyncEngine, clock: VirtualClock) -> None:
    await handle(engine, clock, reserve())
    await handle(engine, clock, ReleaseStock(order_id="o1"))

    assert await handle(engine, clock, reserve()) == [
        StockReservationFailed(order_id="o1", reason="reservation already released")
    ]
    assert await stock_levels(engine) == {"apple": (10, 0), "pear": (3, 0)}


async def test_commit_twice_sells_once(engine: AsyncEngine, clock: VirtualClock) -> None:
    await handle(engine, clock, reserve())
    first = await handle(engine, clock, CommitStock(order_id="o1"))
    second = await handle(engine, clock, CommitStock(order_id="o1"))

    assert first == second == [StockCommitted(order_id="o1")]
    assert await stock_levels(engine) == {"apple": (8, 0), "pear": (3, 0)}
    assert await committed_stock(engine) == {"apple": 2}


async def test_commit_after_release_fails(engine: AsyncEngine, clock: VirtualClock) -> None:
    await handle(engine, clock, reserve())
    await handle(engine, clock, ReleaseStock(order_id="o1"))

    assert await handle(engine, clock, CommitStock(order_id="o1")) == [
        StockCommitFailed(order_id="o1", reason="reservation already released")
    ]


async def test_commit_of_an_unknown_order_fails(engine: AsyncEngine, clock: VirtualClock) -> None:
    assert await handle(engine, clock, CommitStock(order_id="o9")) == [
        StockCommitFailed(order_id="o9", reason="no reservation for this order")
    ]


async def test_release_of_a_committed_order_puts_the_stock_back(engine: AsyncEngine, clock: VirtualClock) -> None:
    await handle(engine, clock, reserve())
    await handle(engine, clock, CommitStock(order_id="o1"))
    sent = await handle(engine, clock, ReleaseStock(order_id="o1"))

    assert sent == [StockReleased(order_id="o1", lines=reserve().lines)]
    assert await stock_levels(engine) == {"apple": (10, 0), "pear": (3, 0)}
    assert await committed_stock(engine) == {}


async def test_expired_reservations_are_released_through_the_outbox(engine: AsyncEngine, clock: VirtualClock) -> None:
    handlers = make_handlers(reservation_ttl=timedelta(minutes=5))
    await handle(engine, clock, reserve("o1"), handlers)
    clock.advance(120)
    await handle(engine, clock, reserve("o2", pear=1), handlers)
    clock.advance(200)

    assert await expire_reservations(engine, clock) == 1
    assert await expire_reservations(engine, clock) == 0
    assert await stock_levels(engine) == {"apple": (10, 0), "pear": (2, 1)}
    assert await handle(engine, clock, CommitStock(order_id="o1")) == [
        StockCommitFailed(order_id="o1", reason="reservation already released")
    ]
    outbox = tables_for(SERVICE).outbox
    async with engine.connect() as connection:
        rows = (await connection.execute(select(outbox).where(outbox.c.type == "stock.released"))).all()
    assert [(row.correlation_id, json.loads(row.body)["payload"]["lines"]) for row in rows] == [
        ("o1", [{"sku": "apple", "quantity": 2}])
    ]


async def test_commit_of_an_expired_reservation_fails_before_the_sweep(engine: AsyncEngine, clock: VirtualClock) -> None:
    await handle(engine, clock, reserve())
    clock.advance(15 * 60)

    [failed] = await handle(engine, clock, CommitStock(order_id="o1"))
    assert isinstance(failed, StockCommitFailed) and "expired" in failed.reason
    assert await stock_levels(engine) == {"apple": (8, 2), "pear": (3, 0)}


async def test_seed_stock_sets_on_hand_and_keeps_reservations(engine: AsyncEngine, clock: VirtualClock) -> None:
    await handle(engine, clock, reserve())
    await seed_stock(engine, {"apple": 4, "plum": 1})

    assert await stock_levels(engine) == {"apple": (4, 2), "pear": (3, 0), "plum": (1, 0)}


async def test_concurrent_reserves_never_oversell(engine: AsyncEngine, clock: VirtualClock) -> None:
    await seed_stock(engine, {"pear": 1})
    outcomes = await asyncio.gather(*(handle(engine, clock, reserve(f"o{i}", pear=1)) for i in range(3)), return_exceptions=True)

    # The losers either saw the stock gone or lost the race to a retryable conflict.
    kinds = sorted(type(o).__name__ if isinstance(o, Exception) else type(o[0]).__name__ for o in outcomes)
    assert kinds.count("StockReserved") == 1
    assert set(kinds) <= {"StockReserved", "StockReservationFailed", ConflictError.__name__}
    assert (await stock_levels(engine))["pear"] == (0, 1)


def outgoing(payload: Payload) -> OutgoingMessage:
    message = new_message(payload, correlation_id=payload.order_id, producer="saga")  # type: ignore[attr-defined]
    return OutgoingMessage(
        message_id=str(message.message_id),
        type=message.type,
        correlation_id=message.correlation_id,
        exchange=exchange_for(payload.kind),
        routing_key=message.type,
        body=encode(message.envelope),
    )


async def test_the_pipeline_applies_a_redelivered_command_once(engine: AsyncEngine, clock: VirtualClock) -> None:
    broker = MemoryBroker(clock)
    processor = MessageProcessor(engine, SERVICE, STOCK_COMMANDS.name, HANDLERS, clock)
    command = outgoing(reserve())
    broker.publish_one(command)
    broker.publish_one(command)  # at-least-once: the same message twice
    while (delivery := broker.get(STOCK_COMMANDS.name)) is not None:
        await processor(delivery)

    assert (processor.processed, processor.duplicates) == (1, 1)
    assert await stock_levels(engine) == {"apple": (8, 2), "pear": (3, 0)}
    outbox = tables_for(SERVICE).outbox
    async with engine.connect() as connection:
        types = (await connection.execute(select(outbox.c.type, outbox.c.correlation_id))).all()
    assert [tuple(row) for row in types] == [("stock.reserved", "o1")]


# ------------------------------------------------------------------ conservation on SQLite

steps = st.lists(
    st.tuples(
        st.sampled_from(["reserve", "commit", "release", "expire"]),
        st.sampled_from(["o1", "o2", "o3"]),
        st.dictionaries(st.sampled_from(["apple", "pear"]), st.integers(1, 6), min_size=1, max_size=2),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=steps)
async def test_stock_is_conserved_across_any_command_sequence(steps: list) -> None:  # type: ignore[type-arg]
    clock = VirtualClock()
    with tempfile.TemporaryDirectory() as directory:
        engine = await new_engine(Path(directory) / "stock.db")
        try:
            initial = {"apple": 10, "pear": 3}
            await seed_stock(engine, initial)
            first_lines: dict[str, dict[str, int]] = {}
            for name, order_id, wanted in steps:
                clock.advance(6 * 60)
                if name == "reserve":
                    await handle(engine, clock, reserve(order_id, **first_lines.setdefault(order_id, wanted)))
                elif name == "commit":
                    await handle(engine, clock, CommitStock(order_id=order_id))
                elif name == "release":
                    await handle(engine, clock, ReleaseStock(order_id=order_id))
                else:
                    await expire_reservations(engine, clock)
            levels = await stock_levels(engine)
            sold = await committed_stock(engine)
        finally:
            await engine.dispose()
    for sku, (on_hand, reserved) in levels.items():
        assert on_hand >= 0 and reserved >= 0
        assert initial[sku] == on_hand + reserved + sold.get(sku, 0)
