"""Ledger: balanced postings (pure) and capture/refund posted once each (SQLite)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from consumers.ledger import HANDLERS, SERVICE, Kind, cash_by_order, ledger_entries, postings_for, rules, trial_balance
from contracts import Money, Payload, Posting, new_message
from contracts.messages import LedgerUpdated, PaymentAuthorized, PaymentRefunded
from infra.clock import VirtualClock
from infra.db import create_engine
from outbox.tables import metadata
from outbox.uow import UnitOfWork

EUR = Money(amount=4_200, currency="EUR")


@given(kind=st.sampled_from(list(Kind)), amount=st.integers(0, 10**12), currency=st.sampled_from(["EUR", "USD"]))
def test_postings_always_balance(kind: Kind, amount: int, currency: str) -> None:
    postings = postings_for(kind, Money(amount=amount, currency=currency))

    assert rules.is_balanced(postings)
    assert len(postings) == (0 if amount == 0 else 2)
    assert sum(rules.balance_changes(postings).values()) == 0


def test_a_capture_debits_cash_and_a_refund_reverses_it() -> None:
    assert postings_for(Kind.CAPTURE, EUR) == (
        Posting(account="cash:EUR", debit=4_200, credit=0),
        Posting(account="sales:EUR", debit=0, credit=4_200),
    )
    assert rules.balance_changes(postings_for(Kind.REFUND, EUR)) == {"cash:EUR": -4_200, "sales:EUR": 4_200}
    assert rules.transaction_id(Kind.REFUND, "o1") == "refund:o1"


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}")
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    yield engine
    await engine.dispose()


async def handle(engine: AsyncEngine, payload: Payload) -> list[Payload]:
    message = new_message(payload, correlation_id=payload.order_id, producer="payments")  # type: ignore[attr-defined]
    async with UnitOfWork(engine, SERVICE, VirtualClock(), incoming=message) as uow:
        await HANDLERS[payload.message_type](uow, message)
        sent = [m.payload for m in uow.pending]
        await uow.commit()
    return sent


async def entry_count(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        return (await connection.execute(select(func.count()).select_from(ledger_entries))).scalar_one()


async def test_a_capture_is_posted_once(engine: AsyncEngine) -> None:
    authorized = PaymentAuthorized(order_id="o1", payment_id="pay_1", amount=EUR)

    first = await handle(engine, authorized)
    again = await handle(engine, authorized)

    assert first == [
        LedgerUpdated(
            order_id="o1",
            transaction_id="capture:o1",
            postings=postings_for(Kind.CAPTURE, EUR),
            balances={"cash:EUR": 4_200, "sales:EUR": -4_200},
        )
    ]
    assert again == []
    assert await entry_count(engine) == 2
    assert await cash_by_order(engine) == {"o1": 4_200}


async def test_a_refund_reverses_the_capture_once(engine: AsyncEngine) -> None:
    await handle(engine, PaymentAuthorized(order_id="o1", payment_id="pay_1", amount=EUR))
    await handle(engine, PaymentAuthorized(order_id="o2", payment_id="pay_2", amount=EUR))
    refunded = PaymentRefunded(order_id="o1", amount=EUR)

    [updated] = await handle(engine, refunded)
    assert await handle(engine, refunded) == []

    assert isinstance(updated, LedgerUpdated)
    assert updated.balances == {"cash:EUR": 4_200, "sales:EUR": -4_200}
    assert await cash_by_order(engine) == {"o1": 0, "o2": 4_200}
    assert await trial_balance(engine) == {
        "debits": 12_600,
        "credits": 12_600,
        "balanced": True,
        "balances": {"cash:EUR": 4_200, "sales:EUR": -4_200},
    }


async def test_a_refund_of_nothing_posts_nothing(engine: AsyncEngine) -> None:
    assert await handle(engine, PaymentRefunded(order_id="o1", amount=Money(amount=0, currency="XXX"))) == []
    assert await entry_count(engine) == 0
    assert await trial_balance(engine) == {"debits": 0, "credits": 0, "balanced": True, "balances": {}}


async def test_a_refund_arriving_before_its_capture_still_balances(engine: AsyncEngine) -> None:
    await handle(engine, PaymentRefunded(order_id="o1", amount=EUR))
    await handle(engine, PaymentAuthorized(order_id="o1", payment_id="pay_1", amount=EUR))

    balance = await trial_balance(engine)
    assert balance["balanced"] and balance["balances"] == {"cash:EUR": 0, "sales:EUR": 0}
