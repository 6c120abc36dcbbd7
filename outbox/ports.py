"""Ports the outbox needs: something that publishes with confirms."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """One message ready for the broker, exactly as it was committed to the outbox."""

    message_id: str
    type: str
    correlation_id: str
    exchange: str
    routing_key: str
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)


class Publisher(Protocol):
    async def publish_batch(self, messages: Sequence[OutgoingMessage]) -> None:
        """Publish persistently, in order; return only once the broker confirmed all.

        Raise TransientError when any message was not confirmed.
        """
        ...
