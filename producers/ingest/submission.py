"""Turn a request body into validated messages, or say exactly which fields are wrong.

Pure: no I/O. The body is either one event or ``{"events": [...]}``; an event is a
full envelope or the short form ``{type, version?, correlation_id, payload}``. The
server fills what is missing: ``message_id``, ``occurred_at``, ``producer`` (always
the authenticated producer) and ``traceparent`` (from the request's header).

`parse_json` is the only way bytes become a body: hostile JSON (nested thousands
deep, 5,000-digit integers, NaN, lone surrogates, NUL) is a 422 naming the field,
never an exception further in, and never a row that fails the shared INSERT.
"""

from __future__ import annotations

import copy
import json
import math
import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

from contracts import REGISTRY, ContractError, Envelope, Message, Payload, Registry, check_saga_key, json_depth
from contracts.envelope import TRACEPARENT_PATTERN
from contracts.export import payload_schemas, schema_name
from contracts.messages import Identifier, StrictInt
from producers.ingest.auth import Producer

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
_RFC3339 = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?(?:[Zz]|[+-][0-9]{2}:[0-9]{2})$")


def _rfc3339_text(value: Any) -> Any:
    # Pydantic would also read 0 or "1700000000" as a time (Unix seconds): coercion.
    if not isinstance(value, str) or not _RFC3339.match(value):
        raise PydanticCustomError(
            "datetime_type", "Input should be an RFC 3339 date-time with an offset, e.g. 2026-01-02T03:04:05Z"
        )
    return value


#: A time as the document says it (`format: date-time`): RFC 3339 text, offset included.
Rfc3339 = Annotated[AwareDatetime, BeforeValidator(_rfc3339_text)]


class EventIn(BaseModel):
    """One event: a full envelope, or just type, correlation id and payload."""

    model_config = ConfigDict(extra="forbid", title="Event")

    type: str = Field(min_length=1, max_length=64, examples=["order.created"])
    version: StrictInt | None = Field(default=None, ge=1, description="Contract version; default: the newest.")
    correlation_id: Identifier = Field(description="Saga id = the order id: must equal `payload.order_id`.")
    payload: dict[str, Any] = Field(description="Validated against the contract of type + version (see /v1/contracts).")
    message_id: uuid.UUID | None = Field(
        default=None,
        description="Default: derived from the Idempotency-Key, else random. An id already accepted is not accepted twice.",
    )
    occurred_at: Rfc3339 | None = Field(default=None, description="Default: when the server accepted it.")
    causation_id: uuid.UUID | None = None
    producer: Identifier | None = Field(default=None, description="If given, must be the API key's producer.")
    traceparent: str | None = Field(
        default=None, max_length=55, pattern=TRACEPARENT_PATTERN, description="W3C trace context; default: the header's."
    )


class BatchIn(BaseModel):
    """Several events, accepted all together or not at all."""

    model_config = ConfigDict(extra="forbid", title="EventBatch")

    events: list[EventIn] = Field(min_length=1)


class Accepted(BaseModel):
    """The events were committed to the outbox; the relay will publish them."""

    message_ids: list[uuid.UUID]
    message_id: uuid.UUID | None = Field(default=None, description="The single event's id (POST /v1/events).")


class FieldError(BaseModel):
    """What is wrong with one field, and where (``["body", "payload", "total"]``)."""

    model_config = ConfigDict(extra="allow")

    loc: list[str | int]
    msg: str
    type: str


class Health(BaseModel):
    """Up (`/livez`) or ready (`/readyz`); not ready is a 503 problem."""

    status: Literal["ok"]


class SubmissionRejected(Exception):
    """The submission cannot be accepted: 422 with field errors, or 403.

    Not the SDK's `producers.sdk.Rejected`, which is what a client sees of such an answer.
    """

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def field_error(loc: Sequence[str | int], msg: str, type_: str) -> dict[str, Any]:
    return {"loc": list(loc), "msg": msg, "type": type_}


def _errors(exc: ValidationError, prefix: Sequence[str | int]) -> list[dict[str, Any]]:
    return [field_error([*prefix, *err["loc"]], err["msg"], err["type"]) for err in exc.errors(include_url=False)]


# ---------------------------------------------------------------- bytes to JSON

#: Largest integer a body may hold: PostgreSQL's BIGINT, and far past any amount.
INT_MAX = 2**63 - 1
INT_MIN = -(2**63)
_INT_MAX_CHARS = len(str(INT_MIN))

#: A JSON string, escapes included; an unterminated one runs to the end. Always
#: matches at a quote without backtracking, so stripping strings is linear.
#: What a string can only get from an escape (strict JSON has no raw control
#: characters, UTF-8 has no surrogates) or a raw DEL: bodies without it skip the walk.
_SUSPECT = re.compile(rb"\\(?:u(?:00[01][0-9a-fA-F]|007[fF]|[dD][89a-fA-F][0-9a-fA-F]{2})|[bfnrt])|\x7f")
_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x1f\x7f]")
#: Fields whose values are identifiers (besides every object key): no control characters.
_IDENTIFIER_FIELDS = frozenset(
    {
        "type",
        "correlation_id",
        "causation_id",
        "message_id",
        "producer",
        "traceparent",
        "occurred_at",
        "sku",
        "account",
        "currency",
    }
)
_MAX_ERRORS = 20


def json_media_type(content_type: str | None) -> bool:
    """True for ``application/json`` (or ``application/*+json``), in UTF-8 if a charset is named."""
    if not content_type:
        return False
    media, _, params = content_type.partition(";")
    kind, _, subtype = media.strip().lower().partition("/")
    if kind != "application" or not (subtype == "json" or subtype.endswith("+json")):
        return False
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            return False
    return True


class _Unfit:
    """A number the parser met that no field may hold; found again by the walk, with its path."""

    __slots__ = ("msg", "type")

    def __init__(self, msg: str, type_: str) -> None:
        self.msg = msg
        self.type = type_


def _parse_int(text: str) -> int | _Unfit:
    # Checked before int(): Python refuses to convert more than 4,300 digits (ValueError).
    if len(text) <= _INT_MAX_CHARS:
        value = int(text)
        if INT_MIN <= value <= INT_MAX:
            return value
    return _Unfit(f"integer out of range: at most 64 bits ({INT_MIN} to {INT_MAX})", "int_out_of_range")


def _parse_float(text: str) -> float | _Unfit:
    value = float(text)
    return value if math.isfinite(value) else _Unfit("number too large to be finite", "number_not_finite")


def _parse_constant(text: str) -> _Unfit:
    return _Unfit(f"{text} is not a JSON number", "number_not_finite")


def _safe_key(key: str) -> str:
    """A key as it may appear in an error location: lone surrogates escaped."""
    return key.encode("utf-8", "backslashreplace").decode("utf-8") if _SURROGATE.search(key) else key


def _text_errors(text: str, identifier: bool) -> Iterator[tuple[str, str]]:
    if _SURROGATE.search(text):
        yield "lone surrogate: not valid Unicode text", "string_unicode"
    elif "\x00" in text:
        yield "contains NUL (\\u0000), which the database cannot store", "string_nul"
    elif identifier and _CONTROL.search(text):
        yield "an identifier may not contain control characters", "string_control_character"


def _walk(body: Any) -> list[dict[str, Any]]:
    """Every unfit number and string in `body`, with its location (iterative: depth is bounded already)."""
    errors: list[dict[str, Any]] = []
    stack: list[tuple[Any, list[str | int], bool]] = [(body, ["body"], False)]
    while stack and len(errors) < _MAX_ERRORS:
        value, loc, identifier = stack.pop()
        if isinstance(value, str):
            errors.extend(field_error(loc, msg, type_) for msg, type_ in _text_errors(value, identifier))
        elif isinstance(value, _Unfit):
            errors.append(field_error(loc, value.msg, value.type))
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):
                at = [*loc, _safe_key(key)]
                errors.extend(field_error(at, f"key: {msg}", type_) for msg, type_ in _text_errors(key, True))
                is_identifier = key in _IDENTIFIER_FIELDS or key.endswith(("_id", "_token"))
                stack.append((item, at, is_identifier))
        elif isinstance(value, list):
            stack.extend((item, [*loc, index], identifier) for index, item in reversed(list(enumerate(value))))
    return errors[:_MAX_ERRORS]


def parse_json(raw: bytes, *, max_depth: int) -> Any:
    """Parse a request body; raise SubmissionRejected(422) naming what no field may hold.

    Refused: bytes that are not UTF-8 JSON; nesting deeper than `max_depth` (checked
    before parsing); integers past 64 bits, NaN and infinities; lone surrogates and NUL
    in any string or key; control characters in keys and identifier fields.
    """
    depth = json_depth(raw)
    if depth > max_depth:
        raise SubmissionRejected(422, [field_error(["body"], f"JSON nested deeper than {max_depth} levels", "json_too_deep")])
    unfit: list[_Unfit] = []

    def number(parse: Callable[[str], Any]) -> Callable[[str], Any]:
        def parse_and_note(text: str) -> Any:
            value = parse(text)
            if isinstance(value, _Unfit):
                unfit.append(value)
            return value

        return parse_and_note

    try:
        body = json.loads(
            raw.decode("utf-8"),
            parse_int=number(_parse_int),
            parse_float=number(_parse_float),
            parse_constant=number(_parse_constant),
        )
    except UnicodeDecodeError as exc:
        raise SubmissionRejected(
            422, [field_error(["body"], f"body is not UTF-8: {exc.reason} at byte {exc.start}", "json_invalid")]
        ) from None
    except RecursionError:
        raise SubmissionRejected(
            422, [field_error(["body"], f"JSON nested deeper than {max_depth} levels", "json_too_deep")]
        ) from None
    except ValueError as exc:  # JSONDecodeError
        raise SubmissionRejected(422, [field_error(["body"], f"invalid JSON: {exc}", "json_invalid")]) from None
    if unfit or _SUSPECT.search(raw):
        errors = _walk(body)
        if errors:
            raise SubmissionRejected(422, errors)
    return body


def newest_versions(registry: Registry = REGISTRY) -> dict[str, type[Payload]]:
    newest: dict[str, type[Payload]] = {}
    for model in registry:
        if model.message_type not in newest or model.message_version > newest[model.message_type].message_version:
            newest[model.message_type] = model
    return newest


_NEWEST = newest_versions()


def parse_events(body: Any, *, batch: bool, max_events: int) -> list[EventIn]:
    """Check the body's shape; raise SubmissionRejected(422) naming each bad field."""
    try:
        events = BatchIn.model_validate(body).events if batch else [EventIn.model_validate(body)]
    except ValidationError as exc:
        raise SubmissionRejected(422, _errors(exc, ["body"])) from None
    if len(events) > max_events:
        raise SubmissionRejected(422, [field_error(["body", "events"], f"at most {max_events} events per batch", "too_long")])
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

    Raise SubmissionRejected(422) with every field error of every event, or
    SubmissionRejected(403) when the producer may not publish one of the types; nothing is
    accepted unless all pass.
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
            errors.append(
                field_error([*at, "type"], f"{event.type!r} is a command; only events can be published", "not_an_event")
            )
        elif not producer.may_publish(event.type):
            forbidden.append(event.type)
        else:
            version = event.version or newest[event.type].message_version
            try:
                model = registry.model_for(event.type, version)
            except ContractError as exc:  # an unknown version
                errors.append(field_error([*at, "version"], str(exc), "unknown_version"))
        if event.producer is not None and event.producer != producer.name:
            errors.append(
                field_error(
                    [*at, "producer"], f"must be {producer.name!r} (the API key's producer) or omitted", "producer_mismatch"
                )
            )
        models.append(model)
    if forbidden:
        allowed = ", ".join(sorted(producer.allowed_types)) or "none"
        raise SubmissionRejected(
            403, f"producer {producer.name!r} may not publish {', '.join(sorted(set(forbidden)))} (allowed: {allowed})"
        )
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
        try:
            check_saga_key(payload, envelope.correlation_id)
        except ContractError as exc:
            errors.append(field_error([*at, "correlation_id"], str(exc), "saga_key_mismatch"))
            continue
        messages.append(Message(envelope=envelope, payload=payload))
    if errors:
        raise SubmissionRejected(422, errors)
    return messages


# ---------------------------------------------------------------- the OpenAPI description

#: What the server checks across fields, which JSON Schema cannot say.
_CROSS_FIELD_RULES = (
    "Checked by the server, not by this schema: `correlation_id` equals `payload.order_id`; an order.created's "
    "`total.amount` is the sum of its lines; a ledger.updated's postings balance; `producer`, if given, is the API "
    "key's producer; the key's producer may publish the type (else 403)."
)


def openapi_components(*, max_batch_events: int, registry: Registry = REGISTRY) -> dict[str, dict[str, Any]]:
    """The request bodies as the OpenAPI document shows them, keyed by component name.

    `EventIn` is a `oneOf`, discriminated by `type`, over every event in the registry;
    each variant's `payload` refers to that event's payload schema from the contracts.
    Documentation only: `parse_events` and `build_messages` decide what is accepted.
    """
    ref = "#/components/schemas/"
    components = payload_schemas(registry, kind="event", ref_prefix=ref)
    base = EventIn.model_json_schema(ref_template=ref + "{model}")
    versions: dict[str, list[type[Payload]]] = {}
    for model in registry:
        if model.kind == "event":
            versions.setdefault(model.message_type, []).append(model)
    mapping: dict[str, str] = {}
    for type_, models in sorted(versions.items()):
        models.sort(key=lambda m: m.message_version)
        variant = copy.deepcopy(base)
        variant["title"] = f"{type_} event"
        variant["description"] = f"One {type_} event: the short form or a full envelope."
        properties = variant["properties"]
        properties["type"] = {"const": type_, "type": "string", "title": "Type"}
        properties["version"] = {
            "anyOf": [{"enum": [m.message_version for m in models], "type": "integer"}, {"type": "null"}],
            "default": None,
            "title": "Version",
            "description": properties["version"]["description"],
        }
        refs = [{"$ref": ref + schema_name(m)} for m in models]
        properties["payload"] = refs[0] if len(refs) == 1 else {"oneOf": refs}
        name = f"EventIn.{type_}"
        components[name] = variant
        mapping[type_] = ref + name
    components["EventIn"] = {
        "title": base["title"],
        "description": f"{base['description']} {_CROSS_FIELD_RULES}",
        "oneOf": [{"$ref": target} for target in mapping.values()],
        "discriminator": {"propertyName": "type", "mapping": mapping},
    }
    batch = BatchIn.model_json_schema(ref_template=ref + "{model}")
    batch.pop("$defs", None)
    batch["properties"]["events"]["maxItems"] = max_batch_events
    components["BatchIn"] = batch
    return components
