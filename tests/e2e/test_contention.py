"""Many orders on a few hot SKUs: the stock service's batches must not deadlock each other."""

from __future__ import annotations

import random
from typing import Any

import pytest

from consumers.ledger import trial_balance
from consumers.stock import seed_stock, stock_levels
from contracts import Message, Money, ReserveStock, StockLine, new_message
from contracts.messages import PaymentAuthorized
from infra.runtime import Runtime
from outbox.ports import OutgoingMessage
from outbox.uow import outbox_row
from tests.e2e.support import Stack, StartServices, unique
from tests.support import eventually

pytestmark = pytest.mark.e2e


def hot_reservations(skus: list[str], count: int) -> list[Message[ReserveStock]]:
    rng = random.Random(7)
    commands = []
    for n in range(count):
        # Two or three of the hot SKUs per order, in any order: each order locks them
        # sorted, but a batch of orders locks them order after order.
        lines = tuple(StockLine(sku=sku, quantity=1) for sku in rng.sample(skus, rng.choice((2, 3))))
        order_id = unique(f"hot-{n}")
        commands.append(new_message(ReserveStock(order_id=order_id, lines=lines), correlation_id=order_id, producer="saga"))
    return commands


async def publish(runtime: Runtime, commands: list[Message[Any]]) -> None:
    rows = [outbox_row(message, message.envelope.occurred_at) for message in commands]
    await runtime.transport.publish_batch(
        [
            OutgoingMessage(
                message_id=row["message_id"],
                type=row["type"],
                correlation_id=row["correlation_id"],
                exchange=row["exchange"],
                routing_key=row["routing_key"],
                body=row["body"].encode(),
                headers={},
            )
            for row in rows
        ]
    )


async def assert_each_reserved_once(stack: Stack, commands: list[Message[ReserveStock]], skus: list[str]) -> None:
    """Reserved units leave on_hand and count as reserved, each exactly once."""
    held = {sku: sum(1 for m in commands for line in m.payload.lines if line.sku == sku) for sku in skus}
    assert {sku: level for sku, level in (await stock_levels(stack.engine)).items() if sku in skus} == {
        sku: (1_000_000 - held[sku], held[sku]) for sku in skus
    }


async def test_reservations_on_a_few_hot_skus_apply_without_a_deadlocked_batch(stack: Stack, services: StartServices) -> None:
    runtime = await services("stock", settings=stack.settings(consumer_workers=4, consumer_batch_size=50, prefetch=200))
    skus = [unique("HOT") for _ in range(4)]
    await seed_stock(stack.engine, dict.fromkeys(skus, 1_000_000))
    commands = hot_reservations(skus, 400)
    await publish(runtime, commands)
    processor = runtime.processors["stock"]
    await eventually(lambda: processor.processed == len(commands), timeout=60, message="reservations not all applied")
    await assert_each_reserved_once(stack, commands, skus)
    # A deadlock rolls a batch back and replays it message by message: none happened.
    assert processor.batch_splits == 0


async def test_stock_processes_sharing_hot_skus_do_not_deadlock_each_other(stack: Stack, services: StartServices) -> None:
    """Two stock processes take batches off one queue at once: each batch locks all its rows up front, sorted."""
    settings = stack.settings(consumer_workers=4, consumer_batch_size=50, prefetch=100)
    runtimes = [await services("stock", settings=settings) for _ in range(2)]
    skus = [unique("HOT") for _ in range(8)]
    await seed_stock(stack.engine, dict.fromkeys(skus, 1_000_000))
    commands = hot_reservations(skus, 600)
    await publish(runtimes[0], commands)
    processors = [runtime.processors["stock"] for runtime in runtimes]
    await eventually(
        lambda: sum(p.processed for p in processors) == len(commands), timeout=90, message="reservations not all applied"
    )
    assert all(p.processed for p in processors), "both processes took part"
    await assert_each_reserved_once(stack, commands, skus)
    assert [p.batch_splits for p in processors] == [0, 0]


async def test_ledger_processes_posting_in_several_currencies_do_not_deadlock_each_other(
    stack: Stack, services: StartServices
) -> None:
    """Batches mixing currencies lock cash:X and sales:X rows; two ledger processes must not cross."""
    settings = stack.settings(consumer_workers=4, consumer_batch_size=50, prefetch=100)
    runtimes = [await services("ledger", settings=settings) for _ in range(2)]
    rng = random.Random(11)
    currencies = ["CHF", "EUR", "GBP", "JPY", "SEK", "USD"]
    events = []
    for n in range(600):
        order_id = unique(f"led-{n}")
        amount = Money(amount=rng.randrange(100, 10_000), currency=rng.choice(currencies))
        events.append(
            new_message(
                PaymentAuthorized(order_id=order_id, payment_id=f"pay-{order_id}", amount=amount),
                correlation_id=order_id,
                producer="payments",
            )
        )
    await publish(runtimes[0], events)
    processors = [runtime.processors["ledger"] for runtime in runtimes]
    await eventually(lambda: sum(p.processed for p in processors) == len(events), timeout=90, message="postings not all applied")
    assert all(p.processed for p in processors), "both processes took part"
    balances = await trial_balance(stack.engine)
    assert balances["balanced"]
    for currency in currencies:
        captured = sum(e.payload.amount.amount for e in events if e.payload.amount.currency == currency)
        assert balances["balances"][f"cash:{currency}"] == captured
        assert balances["balances"][f"sales:{currency}"] == -captured
    assert [p.batch_splits for p in processors] == [0, 0]
