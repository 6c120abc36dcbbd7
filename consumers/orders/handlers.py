"""Order placement, and the handlers that let an order's status follow its saga."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence

import structlog
from opentelemetry import trace
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from consumers.orders import rules
from consumers.orders.rules import Order, OrderStatus
from consumers.orders.store import OrderStore
from consumers.orders.tables import SERVICE
from contracts import BusinessRuleError, ContractError, Message, OrderLine, TransientError
from contracts.clock import Clock
from contracts.messages import OrderCancelled, OrderCompleted, OrderCreated, OrderRejected
from outbox.uow import Handler, UnitOfWork

log = structlog.get_logger("compensa.orders")
tracer = trace.get_tracer("compensa")


async def place_order(
    engine: AsyncEngine,
    clock: Clock,
    *,
    order_id: str | None = None,
    customer_id: str,
    lines: Sequence[OrderLine],
    currency: str,
    payment_token: str,
    uow_factory: Callable[..., UnitOfWork] = UnitOfWork,
) -> str:
    """Record a pending order and announce it in one transaction; return its id.

    Placing the same order again returns its id and announces nothing; placing a
    different order under an existing id raises BusinessRuleError.
    """
    order_id = order_id or str(uuid.uuid4())
    created = _order_created(order_id, customer_id, tuple(lines), currency, payment_token)
    with tracer.start_as_current_span("order.place", attributes={"compensa.saga_id": order_id}):
        try:
            await _place(engine, clock, created, uow_factory)
        except IntegrityError:
            # A concurrent placement of this id committed first: answer as its repeat.
            await _place(engine, clock, created, uow_factory)
    return order_id


def _order_created(
    order_id: str, customer_id: str, lines: tuple[OrderLine, ...], currency: str, payment_token: str
) -> OrderCreated:
    try:
        return OrderCreated(
            order_id=order_id,
            customer_id=customer_id,
            lines=lines,
            total=rules.total_of(lines, currency),
            payment_token=payment_token,
        )
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or '<root>'}: {error['msg']}" for error in exc.errors(include_url=False)
        )
        raise ContractError(f"invalid order {order_id}: {problems}") from None


async def _place(engine: AsyncEngine, clock: Clock, created: OrderCreated, uow_factory: Callable[..., UnitOfWork]) -> None:
    requested = _pending_order(created)
    async with uow_factory(engine, SERVICE, clock) as uow:
        store = OrderStore(uow.connection)
        existing = await store.get(created.order_id)
        if existing is not None:
            if not rules.same_order(existing, requested):
                raise BusinessRuleError(f"order {created.order_id} exists with different contents")
            log.info("order.place_repeated", order_id=created.order_id)
            return
        await store.insert(requested, uow.now())
        uow.send(created, correlation_id=created.order_id)
        await uow.commit()


async def handle_order_created(uow: UnitOfWork, message: Message[OrderCreated]) -> None:
    """Record an order that entered elsewhere (HTTP ingest, SDK, raw AMQP) as pending.

    `compensa order place` stored it already: the same order again is a no-op. Another
    order under an existing id is refused; the saga refuses that second start too.
    """
    created = message.payload
    store = OrderStore(uow.connection)
    requested = _pending_order(created)
    existing = await store.get(created.order_id)
    if existing is None:
        await store.insert(requested, uow.now())
        return
    if not rules.same_order(existing, requested):
        raise BusinessRuleError(f"order {created.order_id} exists with different contents")


def _pending_order(created: OrderCreated) -> Order:
    return Order(
        order_id=created.order_id,
        customer_id=created.customer_id,
        status=OrderStatus.PENDING,
        total=created.total,
        lines=created.lines,
    )


async def handle_order_completed(uow: UnitOfWork, message: Message[OrderCompleted]) -> None:
    """Mark the order completed."""
    await _settle(uow, message.payload.order_id, OrderStatus.COMPLETED, None)


async def handle_order_cancelled(uow: UnitOfWork, message: Message[OrderCancelled]) -> None:
    """Mark the order cancelled, with the saga's reason."""
    await _settle(uow, message.payload.order_id, OrderStatus.CANCELLED, message.payload.reason)


async def handle_order_rejected(uow: UnitOfWork, message: Message[OrderRejected]) -> None:
    """Mark the order rejected, with the saga's reason."""
    await _settle(uow, message.payload.order_id, OrderStatus.REJECTED, message.payload.reason)


async def _settle(uow: UnitOfWork, order_id: str, outcome: OrderStatus, reason: str | None) -> None:
    store = OrderStore(uow.connection)
    order = await store.get(order_id)
    if order is None:
        # Its order.created may still be on the way (a retry, a reordering): retry; past
        # the attempts it is dead-lettered, and an operator can replay it.
        raise TransientError(f"order.{outcome.value} for unknown order {order_id}")
    status = rules.next_status(order.status, outcome)
    if status is None:
        if order.status is outcome:
            log.info("order.outcome_repeated", order_id=order_id, status=order.status.value)
        else:
            log.warning("order.outcome_conflict", order_id=order_id, status=order.status.value, outcome=outcome.value)
        return
    await store.set_status(order_id, status, reason, expected=order.status, now=uow.now())


HANDLERS: dict[str, Handler] = {
    OrderCreated.message_type: handle_order_created,
    OrderCompleted.message_type: handle_order_completed,
    OrderCancelled.message_type: handle_order_cancelled,
    OrderRejected.message_type: handle_order_rejected,
}
