"""Saga state, deadlines and transitions: plain immutable values, easy to persist."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from contracts.messages import Payload


class SagaStatus(StrEnum):
    RUNNING = "running"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    REJECTED = "rejected"
    #: Compensation kept failing; terminal until an operator retries it.
    COMPENSATION_FAILED = "compensation_failed"


TERMINAL: frozenset[SagaStatus] = frozenset(
    {
        SagaStatus.COMPLETED,
        SagaStatus.CANCELLED,
        SagaStatus.REJECTED,
        SagaStatus.COMPENSATION_FAILED,
    }
)

DeadlineKind = Literal["step", "compensation"]


@dataclass(frozen=True)
class SagaState:
    """Where one saga stands. Every field is JSON-able except the two datetimes."""

    saga_id: str
    definition: str
    status: SagaStatus
    #: Index of the step in progress, or of the step at which the saga stopped.
    step: int
    data: Mapping[str, Any]
    #: Steps whose success reply arrived, in arrival order (late ones included).
    done_steps: tuple[str, ...]
    #: Compensation command types sent and not yet confirmed.
    pending_compensations: tuple[str, ...]
    #: Number of the current compensation send (1 = first send).
    compensation_attempts: int
    reason: str | None
    #: Optimistic lock: the engine bumps it by 1 per applied transition.
    version: int
    started_at: datetime
    updated_at: datetime

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL


@dataclass(frozen=True)
class Deadline:
    """When the saga stops waiting: for a step's reply, or for its compensations."""

    due_at: datetime
    kind: DeadlineKind
    #: The step in progress (for "compensation": the step at which compensation began).
    step: str
    #: 1 for a step; the compensation send it guards for "compensation".
    attempt: int


@dataclass(frozen=True)
class Transition:
    """What the engine decided: the new state, what to send, and the deadline to keep.

    When `changed` is False the message was a duplicate or irrelevant: record
    nothing, send nothing, leave the stored deadline alone, just acknowledge.
    """

    state: SagaState
    #: Commands and saga-outcome events, in send order.
    outgoing: tuple[Payload, ...]
    #: The saga's single active deadline after this transition (None = clear it).
    deadline: Deadline | None
    #: Message type, "deadline:<kind>:<step>" or "operator:retry_compensation".
    trigger: str
    note: str
    changed: bool
