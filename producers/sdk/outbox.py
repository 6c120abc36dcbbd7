"""Publish inside the caller's own SQLAlchemy transaction (the transactional outbox)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from contracts import REGISTRY, ContractError, Message, Payload, new_message
from contracts.routing import exchange_for
from outbox.tables import tables_for
from outbox.tracing import create_span_traceparent
from outbox.uow import outbox_row

Target = AsyncConnection | AsyncSession


def _payload(payload: Payload | Mapping[str, Any], type_: str | None, version: int | None) -> Payload:
    if isinstance(payload, Payload):
        return payload
    if type_ is None:
        raise ContractError("a payload given as a mapping needs type= (e.g. type='order.created')")
    newest = max((m.message_version for m in REGISTRY if m.message_type == type_), default=None)
    if newest is None:
        raise ContractError(f"unknown message type {type_!r}")
    model = REGISTRY.model_for(type_, version or newest)
    try:
        return model.model_validate(dict(payload))
    except ValidationError as exc:
        raise ContractError(f"invalid payload for {type_} v{model.message_version}: {exc}") from None


def build_message(
    payload: Payload | Mapping[str, Any] | Message[Any],
    *,
    correlation_id: str | None,
    producer: str | None,
    type_: str | None = None,
    version: int | None = None,
    causation_id: uuid.UUID | None = None,
    message_id: uuid.UUID | None = None,
    occurred_at: datetime | None = None,
) -> Message[Any]:
    """Validate a payload and wrap it in an envelope whose traceparent is its create span.

    A built `Message` is returned as it is (a retry re-sends the same message id).
    Raise ContractError for an invalid payload or a missing correlation id or producer.
    """
    if isinstance(payload, Message):
        return payload
    if not correlation_id or not producer:
        raise ContractError("correlation_id and producer are required")
    validated = _payload(payload, type_, version)
    message_id = message_id or uuid.uuid4()
    # The create span: a child of the caller's span, or the root of the saga's trace.
    traceparent = create_span_traceparent(validated.message_type, exchange_for(validated.kind), str(message_id), correlation_id)
    return new_message(
        validated,
        correlation_id=correlation_id,
        producer=producer,
        causation_id=causation_id,
        traceparent=traceparent,
        occurred_at=occurred_at,
        message_id=message_id,
    )


async def publish(
    target: Target,
    payload: Payload | Mapping[str, Any] | Message[Any],
    *,
    correlation_id: str | None = None,
    producer: str | None = None,
    type: str | None = None,  # noqa: A002 - mirrors the envelope's field
    version: int | None = None,
    causation_id: uuid.UUID | None = None,
    message_id: uuid.UUID | None = None,
    occurred_at: datetime | None = None,
    outbox: str = "ingest",
) -> Message[Any]:
    """Add one event to the outbox inside the caller's transaction; return the message.

    `target` is the caller's AsyncConnection or AsyncSession: the row commits or rolls
    back with their business change. Nothing is published here; a relay does that
    after the commit. Raise ContractError for an invalid payload.
    """
    message = build_message(
        payload,
        correlation_id=correlation_id,
        producer=producer,
        type_=type,
        version=version,
        causation_id=causation_id,
        message_id=message_id,
        occurred_at=occurred_at,
    )
    await publish_many(target, [message], outbox=outbox)
    return message


async def publish_many(target: Target, messages: Sequence[Message[Any]], *, outbox: str = "ingest") -> None:
    """Add built messages (see `contracts.new_message`) to the outbox in the caller's transaction."""
    if not messages:
        return
    now = datetime.now(UTC)
    rows = [outbox_row(message, now) for message in messages]
    await target.execute(insert(tables_for(outbox).outbox), rows)
