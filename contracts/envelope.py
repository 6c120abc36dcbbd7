"""The envelope every message travels in, and the registry that decodes it."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import accumulate
from typing import Annotated, Any, Generic, TypeVar

from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from contracts.errors import ContractError
from contracts.messages import COMMANDS, EVENTS, Identifier, Payload, StrictInt

#: Largest message body any edge accepts. The biggest legitimate message (an order of
#: 100 lines) is about 15 KB; a consumer holds every body in memory.
MAX_MESSAGE_BYTES = 1024 * 1024

TRACEPARENT_PATTERN = r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"

P = TypeVar("P", bound=Payload)


_RFC3339_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]")


def _time_as_text(value: Any) -> Any:
    """An RFC 3339 string (or a datetime built in code), never a number read as epoch seconds."""
    if isinstance(value, datetime) or (isinstance(value, str) and _RFC3339_DATE.match(value)):
        return value
    raise ValueError("must be an RFC 3339 date-time string with an offset")


class Envelope(BaseModel):
    """Metadata plus the raw payload; the JSON body of every AMQP message."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    message_id: uuid.UUID
    type: str = Field(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
    version: StrictInt = Field(ge=1, le=10_000)
    occurred_at: Annotated[AwareDatetime, BeforeValidator(_time_as_text)]
    correlation_id: Identifier = Field(description="Saga id = the business key (order id).")
    causation_id: uuid.UUID | None = None
    producer: Identifier
    traceparent: str | None = Field(default=None, pattern=TRACEPARENT_PATTERN)
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Message(Generic[P]):
    """A decoded message: its envelope and its validated, typed payload."""

    envelope: Envelope
    payload: P

    @property
    def type(self) -> str:
        return self.envelope.type

    @property
    def message_id(self) -> uuid.UUID:
        return self.envelope.message_id

    @property
    def correlation_id(self) -> str:
        return self.envelope.correlation_id


class Registry:
    """Maps `(type, version)` to the payload model that validates it."""

    def __init__(self, models: tuple[type[Payload], ...]) -> None:
        self._models: dict[tuple[str, int], type[Payload]] = {}
        for model in models:
            key = (model.message_type, model.message_version)
            if key in self._models:
                raise ValueError(f"duplicate contract {key}")
            self._models[key] = model

    def extend(self, models: Iterable[type[Payload]]) -> None:
        """Register an application's contracts (`--app`); registering the same model again is a no-op."""
        for model in models:
            key = (model.message_type, model.message_version)
            known = self._models.setdefault(key, model)
            if known is not model:
                raise ValueError(f"contract {key} is already registered as {known.__module__}.{known.__qualname__}")

    def remove(self, models: Iterable[type[Payload]]) -> None:
        """Forget contracts `extend` registered (a test that loaded an app in its own process)."""
        for model in models:
            key = (model.message_type, model.message_version)
            if self._models.get(key) is model:
                del self._models[key]

    def model_for(self, type_: str, version: int) -> type[Payload]:
        try:
            return self._models[(type_, version)]
        except KeyError:
            known = sorted(v for t, v in self._models if t == type_)
            if known:
                raise ContractError(f"unknown version {version} of {type_!r} (known: {known})") from None
            raise ContractError(f"unknown message type {type_!r}") from None

    def __iter__(self) -> Iterator[type[Payload]]:
        return iter(self._models.values())

    def types(self) -> list[str]:
        return sorted({t for t, _ in self._models})


REGISTRY = Registry(EVENTS + COMMANDS)


def _errors_text(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


#: Strings (closed, or cut off by the end of the text) and the bytes that are not brackets.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*\\?(?:"|\Z)', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DEPTH_STEP = [0] * 256
_DEPTH_STEP[ord("[")] = _DEPTH_STEP[ord("{")] = 1
_DEPTH_STEP[ord("]")] = _DEPTH_STEP[ord("}")] = -1


def json_depth(raw: bytes | str) -> int:
    """How deep arrays and objects nest in `raw`, without parsing it (linear, no recursion).

    Exact for valid JSON; an estimate for the rest, which a parser refuses anyway. Every
    edge that must bound nesting before it parses (HTTP ingest, `--edit` patches, stored
    bodies shown by the CLI) asks this.
    """
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    brackets = _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0)


def parse_envelope(body: bytes | str) -> Envelope:
    """Parse raw bytes into an envelope; raise ContractError saying exactly what is wrong."""
    if len(body) > MAX_MESSAGE_BYTES:
        raise ContractError(f"body is {len(body)} bytes; at most {MAX_MESSAGE_BYTES} are accepted")
    try:
        raw = json.loads(body)
    except RecursionError:
        raise ContractError("body is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, bad UTF-8, an integer past the digit limit
        raise ContractError(f"body is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(raw, dict):
        raise ContractError(f"body must be a JSON object, got {type(raw).__name__}")
    try:
        return Envelope.model_validate(raw)
    except ValidationError as exc:
        raise ContractError(f"invalid envelope: {_errors_text(exc)}") from None


def validate_payload(envelope: Envelope, registry: Registry = REGISTRY) -> Message[Payload]:
    """Validate the envelope's payload against its registered contract.

    A payload that names its saga (`Payload.saga_key`) must name the envelope's
    correlation id: otherwise a message of one saga could move another's stock or money.
    """
    model = registry.model_for(envelope.type, envelope.version)
    try:
        payload = model.model_validate(envelope.payload)
    except ValidationError as exc:
        raise ContractError(f"invalid payload for {envelope.type} v{envelope.version}: {_errors_text(exc)}") from None
    check_saga_key(payload, envelope.correlation_id)
    return Message(envelope=envelope, payload=payload)


def check_saga_key(payload: Payload, correlation_id: str) -> None:
    """Raise ContractError unless the payload belongs to the saga `correlation_id` names."""
    key = payload.saga_key
    if key is not None and getattr(payload, key) != correlation_id:
        raise ContractError(
            f"correlation_id {correlation_id!r} != payload.{key} {getattr(payload, key)!r}: "
            f"a {payload.message_type} belongs to the saga of its {key}"
        )


def decode(body: bytes | str, registry: Registry = REGISTRY) -> Message[Payload]:
    """Decode and validate a message body; raise ContractError on any defect."""
    return validate_payload(parse_envelope(body), registry)


def encode(envelope: Envelope) -> bytes:
    return envelope.model_dump_json().encode()


def new_message(
    payload: P,
    *,
    correlation_id: str,
    producer: str,
    causation_id: uuid.UUID | None = None,
    traceparent: str | None = None,
    occurred_at: datetime | None = None,
    message_id: uuid.UUID | None = None,
) -> Message[P]:
    """Wrap a payload in a fresh envelope (of the saga its business key names)."""
    check_saga_key(payload, correlation_id)
    envelope = Envelope(
        message_id=message_id or uuid.uuid4(),
        type=payload.message_type,
        version=payload.message_version,
        occurred_at=occurred_at or datetime.now(UTC),
        correlation_id=correlation_id,
        causation_id=causation_id,
        producer=producer,
        traceparent=traceparent,
        payload=payload.model_dump(mode="json"),
    )
    return Message(envelope=envelope, payload=payload)
