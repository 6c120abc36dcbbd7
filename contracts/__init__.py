"""Message contracts: the envelope, every event and command, and their registry."""

from contracts.envelope import (
    REGISTRY,
    Envelope,
    Message,
    Registry,
    decode,
    encode,
    new_message,
    parse_envelope,
    validate_payload,
)
from contracts.errors import (
    BusinessRuleError,
    CompensaError,
    ConflictError,
    ContractError,
    TransientError,
)
from contracts.messages import *  # noqa: F403
from contracts.messages import COMMANDS, EVENTS, Money, OrderLine, Payload, Posting, StockLine

__all__ = [
    "REGISTRY", "Envelope", "Message", "Registry", "decode", "encode", "new_message",
    "parse_envelope", "validate_payload", "BusinessRuleError", "CompensaError",
    "ConflictError", "ContractError", "TransientError", "COMMANDS", "EVENTS", "Money",
    "OrderLine", "Payload", "Posting", "StockLine",
]
