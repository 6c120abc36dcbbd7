"""Where each message goes: events to the topic exchange, commands to the direct one."""

from __future__ import annotations

EVENTS_EXCHANGE = "compensa.events"
COMMANDS_EXCHANGE = "compensa.commands"
DEAD_LETTER_EXCHANGE = "compensa.dlx"
#: AMQP's default exchange: the routing key is the name of the one queue to deliver to.
DEFAULT_EXCHANGE = ""


def exchange_for(kind: str) -> str:
    """Return the exchange name a message of this kind is published to."""
    if kind == "event":
        return EVENTS_EXCHANGE
    if kind == "command":
        return COMMANDS_EXCHANGE
    raise ValueError(f"unknown message kind {kind!r}")
