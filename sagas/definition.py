"""Saga definitions as data: ordered steps, their replies, compensations and deadlines.

A definition says *what* a saga does; `sagas.engine` decides *when*. Adding a saga
means writing a new `SagaDefinition`, never touching the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from contracts.messages import Payload

SagaData = Mapping[str, Any]
"""The saga's own JSON-able working data (ids, lines, amounts, reply details)."""


def _built(expected: type[Payload], payload: Payload, purpose: str) -> Payload:
    # A builder returning the wrong command would send a message nobody expects;
    # fail loudly at the first use instead.
    if not isinstance(payload, expected):
        raise TypeError(f"{purpose} must build {expected.__name__}, got {type(payload).__name__}")
    return payload


@dataclass(frozen=True)
class Compensation:
    """The command that undoes a step, and the event that confirms it was undone.

    `build` must work from the data known *before* the step's reply: a timed-out
    step is compensated without ever having seen one.
    """

    command: type[Payload]
    build: Callable[[SagaData], Payload]
    confirmed_by: type[Payload]

    @property
    def command_type(self) -> str:
        return self.command.message_type

    def command_for(self, data: SagaData) -> Payload:
        """Build the compensation command from the saga data."""
        return _built(self.command, self.build(data), f"compensation {self.command_type}")


@dataclass(frozen=True)
class Step:
    """One forward step: the command it sends, the replies it awaits, its undo."""

    name: str
    command: type[Payload]
    build: Callable[[SagaData], Payload]
    success: type[Payload]
    failures: tuple[type[Payload], ...]
    deadline: timedelta
    compensation: Compensation | None
    #: Return the saga data updated with what the success reply carries.
    on_success: Callable[[SagaData, Payload], SagaData] | None = None

    def command_for(self, data: SagaData) -> Payload:
        """Build the step's command from the saga data."""
        return _built(self.command, self.build(data), f"step {self.name!r}")

    def reply_types(self) -> tuple[str, ...]:
        return (self.success.message_type, *(f.message_type for f in self.failures))

    def data_after(self, data: SagaData, success: Payload) -> SagaData:
        """Merge a success reply into the saga data."""
        return dict(self.on_success(data, success)) if self.on_success else data


@dataclass(frozen=True)
class SagaDefinition:
    """A saga as data: how it starts, its ordered steps, and how it ends."""

    name: str
    starts_with: type[Payload]
    initial_data: Callable[[Payload], SagaData]
    steps: tuple[Step, ...]
    completed: Callable[[SagaData], Payload]
    cancelled: Callable[[SagaData, str], Payload]
    rejected: Callable[[SagaData, str], Payload]
    compensation_deadline: timedelta
    max_compensation_attempts: int

    def __post_init__(self) -> None:
        _check_definition(self)

    def step_replying_with(self, message_type: str) -> Step | None:
        """Return the step whose success or failure reply has this type."""
        return next((s for s in self.steps if message_type in s.reply_types()), None)

    def compensation_confirmed_by(self, message_type: str) -> Compensation | None:
        """Return the compensation this event confirms, if it confirms one."""
        return next(
            (c for c in self._compensations() if c.confirmed_by.message_type == message_type),
            None,
        )

    def compensation_for(self, command_type: str) -> Compensation:
        """Return the compensation that sends this command type."""
        for compensation in self._compensations():
            if compensation.command_type == command_type:
                return compensation
        raise KeyError(f"{self.name} has no compensation {command_type!r}")

    def handled_types(self) -> frozenset[str]:
        """Every event type this saga consumes (for queue bindings)."""
        replies = {t for step in self.steps for t in step.reply_types()}
        confirmations = {c.confirmed_by.message_type for c in self._compensations()}
        return frozenset({self.starts_with.message_type} | replies | confirmations)

    def _compensations(self) -> tuple[Compensation, ...]:
        return tuple(s.compensation for s in self.steps if s.compensation is not None)


def _check_definition(definition: SagaDefinition) -> None:
    """Refuse definitions in which an incoming message could mean two things."""
    if not definition.steps:
        raise ValueError(f"saga {definition.name!r} has no steps")
    if definition.max_compensation_attempts < 1:
        raise ValueError("max_compensation_attempts must be at least 1")
    names = [step.name for step in definition.steps]
    if len(set(names)) != len(names):
        raise ValueError(f"saga {definition.name!r} has duplicate step names: {names}")

    owner: dict[str, str] = {definition.starts_with.message_type: "the start message"}
    for step in definition.steps:
        for reply in step.reply_types():
            if reply in owner:
                raise ValueError(f"{reply!r} is both {owner[reply]} and a reply of step {step.name!r}")
            owner[reply] = f"a reply of step {step.name!r}"

    by_command: dict[str, str] = {}  # compensation command type -> confirmation type
    by_confirmation: dict[str, str] = {}  # and back
    for compensation in definition._compensations():
        command, confirmation = compensation.command_type, compensation.confirmed_by.message_type
        if confirmation in owner:
            raise ValueError(f"{confirmation!r} confirms a compensation and is also {owner[confirmation]}")
        if by_command.setdefault(command, confirmation) != confirmation:
            raise ValueError(f"compensation {command!r} is confirmed by two different events")
        if by_confirmation.setdefault(confirmation, command) != command:
            raise ValueError(f"{confirmation!r} confirms two different compensations")
