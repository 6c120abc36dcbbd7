"""Message contracts: the envelope, every event and command, and their registry."""

from contracts.envelope import (
    MAX_MESSAGE_BYTES,
    REGISTRY,
    Envelope,
    Message,
    Registry,
    check_saga_key,
    decode,
    encode,
    json_depth,
    new_message,
    parse_envelope,
    validate_payload,
)
from contracts.errors import (
    BusinessRuleError,
    CompensaError,
    ConflictError,
    ContractError,
    Deferred,
    TransientError,
)
from contracts.messages import *  # noqa: F403
from contracts.messages import COMMANDS, EVENTS, Money, OrderLine, OrderPayload, Payload, Posting, StockLine

__all__ = [
    "COMMANDS",
    "EVENTS",
    "MAX_MESSAGE_BYTES",
    "REGISTRY",
    "BusinessRuleError",
    "CompensaError",
    "ConflictError",
    "ContractError",
    "Deferred",
    "Envelope",
    "Message",
    "Money",
    "OrderLine",
    "OrderPayload",
    "Payload",
    "Posting",
    "Registry",
    "StockLine",
    "TransientError",
    "check_saga_key",
    "decode",
    "encode",
    "json_depth",
    "new_message",
    "parse_envelope",
    "validate_payload",
]
