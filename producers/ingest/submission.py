"""Turn a request body into validated messages, or say exactly which fields are wrong.

Pure: no I/O. The body is either one event or ``{"events": [...]}``; an event is a
full envelope or the short form ``{type, version?, correlation_id, payload}``. The
server fills what is missing: ``message_id``, ``occurred_at``, ``producer`` (always
the authenticated producer) and ``traceparent`` (from the request's header).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from contracts import REGISTRY, Envelope, Message, Payload, Registry
from producers.ingest.auth import Producer

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


class EventIn(BaseModel):
    """One event: a full envelope, or just type, correlation id and payload."""

    model_config = ConfigDict(extra="forbid", title="Event")

    type: str = Field(min_length=1, max_length=64, examples=["order.created"])
    version: int | None = Field(default=None, ge=1, description="Contract version; default: the newest.")
    correlation_id: str = Field(min_length=1, max_length=64, description="Saga id = order id.")
    payload: dict[str, Any] = Field(description="Validated against the contract of type + version (see /v1/contracts).")
    message_id: uuid.UUID | None = Field(
        default=None, description="Default: derived from the Idempotency-Key, else random. An id already accepted is not accepted twice."
    )
    occurred_at: AwareDatetime | None = Field(default=None, description="Default: when the server accepted it.")
    causation_id: uuid.UUID | None = None
    producer: str | None = Field(default=None, max_length=64, description="If given, must be the API key's producer.")
    traceparent: str | None = Field(default=None, max_length=55)


class BatchIn(BaseModel):
    """Several events, accepted all together or not at all."""

    model_config = ConfigDict(extra="forbid", title="EventBatch")

    events: list[EventIn] = Field(min_length=1)


class Accepted(BaseModel):
    """The events were committed to the outbox; the relay will publish them."""

    message_ids: list[uuid.UUID]
    message_id: uuid.UUID | None = Field(default=None, description="The single event's id (POST /v1/events).")


class Rejected(Exception):
    """The submission cannot be accepted: 422 with field errors, or 403."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def field_error(loc: Sequence[str | int], msg: str, type_: str) -> dict[str, Any]:
    return {"loc": list(loc), "msg": msg, "type": type_}


def _errors(exc: ValidationError, prefix: Sequence[str | int]) -> list[dict[str, Any]]:
    return [
        field_error([*prefix, *err["loc"]], err["msg"], err["type"]) for err in exc.errors(include_url=False)
    ]


def newest_versions(registry: Registry = REGISTRY) -> dict[str, type[Payload]]:
    newest: dict[str, type[Payload]] = {}
    for model in registry:
        if model.message_type not in newest or model.message_version > newest[model.message_type].message_version:
            newest[model.message_type] = model
    return newest


_NEWEST = newest_versions()


def parse_events(body: Any, *, batch: bool, max_events: int) -> list[EventIn]:
    """Check the body's shape; raise Rejected(422) naming each bad field."""
    try:
        if batch:
            events = BatchIn.model_validate(body).events
        else:
            events = [EventIn.model_validate(body)]
    except ValidationError as exc:
        raise Rejected(422, _errors(exc, ["body"])) from None
    if len(events) > max_events:
        raise Rejected(422, [field_error(["body", "events"], f"at most {max_events} events per batch", "too_long")])
    return events


def build_messages(
    events: Sequence[EventIn],
    *,
    batch: bool,
    producer: Producer,
    now: datetime,
    ids: Callable[[int], uuid.UUID],
    traceparent: str | None = None,
    registry: Registry = REGISTRY,
) -> list[Message[Payload]]:
    """Validate every event against its contract and wrap it in an envelope.

    Raise Rejected(422) with every field error of every event, or Rejected(403) when the
    producer may not publish one of the types; nothing is accepted unless all pass.
    """
    if traceparent is not None and not _TRACEPARENT.match(traceparent):
        traceparent = None
    newest = _NEWEST if registry is REGISTRY else newest_versions(registry)
    errors: list[dict[str, Any]] = []
    forbidden: list[str] = []
    models: list[type[Payload] | None] = []
    for index, event in enumerate(events):
        at: list[str | int] = ["body", "events", index] if batch else ["body"]
        model = None
        if event.type not in newest:
            errors.append(field_error([*at, "type"], f"unknown message type {event.type!r}", "unknown_type"))
        elif newest[event.type].kind != "event":
            errors.append(field_error([*at, "type"], f"{event.type!r} is a command; only events can be published", "not_an_event"))
        elif not producer.may_publish(event.type):
            forbidden.append(event.type)
        else:
            version = event.version or newest[event.type].message_version
            try:
                model = registry.model_for(event.type, version)
            except Exception as exc:  # ContractError: unknown version
                errors.append(field_error([*at, "version"], str(exc), "unknown_version"))
        if event.producer is not None and event.producer != producer.name:
            errors.append(
                field_error([*at, "producer"], f"must be {producer.name!r} (the API key's producer) or omitted", "producer_mismatch")
            )
        models.append(model)
    if forbidden:
        allowed = ", ".join(sorted(producer.allowed_types)) or "none"
        raise Rejected(403, f"producer {producer.name!r} may not publish {', '.join(sorted(set(forbidden)))} (allowed: {allowed})")
    messages: list[Message[Payload]] = []
    for index, (event, model) in enumerate(zip(events, models, strict=True)):
        if model is None:
            continue
        at = ["body", "events", index] if batch else ["body"]
        try:
            payload = model.model_validate(event.payload)
        except ValidationError as exc:
            errors.extend(_errors(exc, [*at, "payload"]))
            continue
        try:
            envelope = Envelope(
                message_id=event.message_id or ids(index),
                type=model.message_type,
                version=model.message_version,
                occurred_at=event.occurred_at or now,
                correlation_id=event.correlation_id,
                causation_id=event.causation_id,
                producer=producer.name,
                traceparent=event.traceparent or traceparent,
                payload=payload.model_dump(mode="json"),
            )
        except ValidationError as exc:
            errors.extend(_errors(exc, at))
            continue
        messages.append(Message(envelope=envelope, payload=payload))
    if errors:
        raise Rejected(422, errors)
    return messages
