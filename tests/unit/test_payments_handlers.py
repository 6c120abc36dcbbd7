"""Payment handlers on SQLite: charge and refund once per order, in any arrival order."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from consumers.payments import SERVICE, RuleBasedGateway, charges, make_handlers, net_captured, payment_id_for
from consumers.payments.gateway import Authorization, Decline
from consumers.payments.rules import ChargeStatus
from contracts import BusinessRuleError, Money, Payload, TransientError, encode, new_message
from contracts.messages import ChargePayment, PaymentAuthorized, PaymentDeclined, PaymentRefunded, RefundPayment
from contracts.routing import exchange_for
from infra.clock import VirtualClock
from infra.db import create_engine
from infra.pipeline import MessageProcessor
from infra.topology import PAYMENTS_COMMANDS
from infra.transport.memory import MemoryBroker
from outbox.ports import OutgoingMessage
from outbox.tables import metadata, tables_for
from outbox.uow import UnitOfWork

EUR = Money(amount=4_200, currency="EUR")


class RecordingGateway(RuleBasedGateway):
    """The rule-based gateway, remembering every call it answered."""

    def __init__(self) -> None:
        super().__init__()
        self.authorized: list[str] = []
        self.refunds: list[tuple[str, Money]] = []

    async def authorize(self, order_id: str, amount: Money, token: str) -> Authorization | Decline:
        result = await super().authorize(order_id, amount, token)
        self.authorized.append(order_id)
        return result

    async def refund(self, payment_id: str, amount: Money) -> None:
        await super().refund(payment_id, amount)
        self.refunds.append((payment_id, amount))


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'payments.db'}")
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    yield engine
    await engine.dispose()


@pytest.fixture
def gateway() -> RecordingGateway:
    return RecordingGateway()


@pytest.fixture
def run(engine: AsyncEngine, gateway: RecordingGateway) -> Any:
    handlers = make_handlers(gateway)
    clock = VirtualClock()

    async def run(payload: Payload) -> list[Payload]:
        message = new_message(payload, correlation_id=payload.order_id, producer="saga")  # type: ignore[attr-defined]
        async with UnitOfWork(engine, SERVICE, clock, incoming=message) as uow:
            await handlers[payload.message_type](uow, message)
            sent = [m.payload for m in uow.pending]
            await uow.commit()
        return sent

    return run


def charge(token: str = "tok_visa", amount: Money = EUR) -> ChargePayment:
    return ChargePayment(order_id="o1", amount=amount, payment_token=token)


REFUND = RefundPayment(order_id="o1")
AUTHORIZED = PaymentAuthorized(order_id="o1", payment_id=payment_id_for("o1"), amount=EUR)


async def test_charge_authorizes_once_and_repeats_its_answer(run: Any, engine: AsyncEngine, gateway: RecordingGateway) -> None:
    assert await run(charge()) == [AUTHORIZED]
    assert await run(charge()) == [AUTHORIZED]

    assert gateway.authorized == ["o1"]
    assert (await charges(engine))["o1"].status is ChargeStatus.AUTHORIZED
    assert await net_captured(engine) == {"o1": 4_200}


async def test_a_declined_charge_stays_declined(run: Any, engine: AsyncEngine) -> None:
    declined = [PaymentDeclined(order_id="o1", reason="card declined")]

    assert await run(charge("tok_decline")) == declined
    assert await run(charge("tok_decline")) == declined
    assert (await charges(engine))["o1"].status is ChargeStatus.DECLINED
    assert await net_captured(engine) == {}


async def test_refund_twice_returns_the_money_once(run: Any, engine: AsyncEngine, gateway: RecordingGateway) -> None:
    await run(charge())

    assert await run(REFUND) == [PaymentRefunded(order_id="o1", amount=EUR)]
    assert await run(REFUND) == [PaymentRefunded(order_id="o1", amount=Money(amount=0, currency="EUR"))]
    assert gateway.refunds == [(payment_id_for("o1"), EUR)]
    stored = (await charges(engine))["o1"]
    assert (stored.status, stored.refunded_amount) == (ChargeStatus.REFUNDED, 4_200)
    assert await net_captured(engine) == {"o1": 0}


async def test_refund_before_charge_voids_the_order(run: Any, engine: AsyncEngine, gateway: RecordingGateway) -> None:
    assert await run(REFUND) == [PaymentRefunded(order_id="o1", amount=Money(amount=0, currency="XXX"))]
    assert await run(charge()) == [PaymentDeclined(order_id="o1", reason="order voided")]

    assert gateway.authorized == []
    assert (await charges(engine))["o1"].status is ChargeStatus.VOIDED


async def test_a_charge_after_the_refund_is_declined(run: Any, gateway: RecordingGateway) -> None:
    await run(charge())
    await run(REFUND)

    assert await run(charge()) == [PaymentDeclined(order_id="o1", reason="order already refunded")]
    assert gateway.authorized == ["o1"]


async def test_refund_of_a_declined_charge_returns_nothing(run: Any, gateway: RecordingGateway) -> None:
    await run(charge("tok_decline"))

    assert await run(REFUND) == [PaymentRefunded(order_id="o1", amount=Money(amount=0, currency="EUR"))]
    assert gateway.refunds == []


async def test_an_unavailable_gateway_leaves_no_trace(run: Any, engine: AsyncEngine) -> None:
    with pytest.raises(TransientError):
        await run(charge("tok_unavailable"))

    assert await charges(engine) == {}
    assert await run(charge()) == [AUTHORIZED]


async def test_a_charge_for_another_amount_is_refused(run: Any) -> None:
    await run(charge())

    with pytest.raises(BusinessRuleError):
        await run(charge(amount=Money(amount=1, currency="EUR")))


async def test_the_pipeline_retries_an_unavailable_gateway(engine: AsyncEngine, gateway: RecordingGateway) -> None:
    clock = VirtualClock()
    broker = MemoryBroker(clock)
    processor = MessageProcessor(engine, SERVICE, PAYMENTS_COMMANDS.name, make_handlers(gateway), clock)
    message = new_message(charge("tok_unavailable"), correlation_id="o1", producer="saga")
    broker.publish_one(
        OutgoingMessage(
            message_id=str(message.message_id),
            type=message.type,
            correlation_id="o1",
            exchange=exchange_for("command"),
            routing_key=message.type,
            body=encode(message.envelope),
        )
    )
    await processor(broker.get(PAYMENTS_COMMANDS.name))  # type: ignore[arg-type]

    assert (broker.delayed_count(), broker.stats.dead_lettered) == (1, 0)
    outbox = tables_for(SERVICE).outbox
    async with engine.connect() as connection:
        assert (await connection.execute(select(outbox))).all() == []


async def test_a_refund_racing_the_charge_leaves_no_money_behind(
    run: Any, engine: AsyncEngine, gateway: RecordingGateway
) -> None:
    async def until_done(payload: Payload) -> list[Payload]:
        # What the pipeline does with a transient failure: try again.
        for _ in range(5):
            try:
                return await run(payload)
            except (TransientError, IntegrityError):
                continue
        raise AssertionError(f"{payload} kept failing")

    await asyncio.gather(until_done(charge()), until_done(REFUND))

    assert await net_captured(engine) in ({}, {"o1": 0})
    assert len(gateway.authorized) == len(gateway.refunds)
