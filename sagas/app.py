"""The saga application: the public contract a team fills in to run and simulate its own saga.

An application bundles everything compensa needs to host a saga:

- `sagas`: its `SagaDefinition`s (steps, commands, replies, compensations, deadlines);
- `messages`: the pydantic payload classes of every command and event it sends or reads;
- `participants`: the services that answer the saga's commands, each with its queue, one
  handler per message type and the tables it owns;
- `simulation`: a workload generator and invariants over the final state (and optional
  coverage goals), for `compensa simulate --app module:attr`.

`compensa run|simulate|saga|db upgrade|topology declare --app module:attr` load one; without
`--app` they host the order saga (`infra.apps.ORDER_APP`). docs/tutorial.md walks through
writing one; examples/trip is a complete one. This module is pure data: nothing here does I/O.
"""

from __future__ import annotations

import random
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Table

from contracts.messages import Payload
from sagas.definition import SagaDefinition
from sagas.simulation.invariants import Violation

#: What a participant runs for one message: `(unit_of_work, message) -> None` (see outbox.uow.Handler).
#: Typed loosely here so that this contract imports nothing but contracts and sagas.
AppHandler = Callable[..., Awaitable[None]]
#: A participant's handlers: by message type, or built from the composition root's parts
#: (`infra.bootstrap.Parts`: the settings, the clock, the payment gateway) when they need them.
HandlerSource = Mapping[str, AppHandler] | Callable[[Any], Mapping[str, AppHandler]]

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_QUEUE = re.compile(r"^[a-z][a-z0-9_.]{0,99}$")
#: Names compensa's own services use: an app's participant may not take one.
RESERVED_SERVICES = frozenset({"saga", "ingest", "dlq"})


@dataclass(frozen=True)
class Participant:
    """A service that consumes one queue: one handler per message type, and the tables it owns.

    Its outbox and inbox tables (`<name>_outbox`, `<name>_inbox`) come with it: a handler
    changes its rows and stages replies on the unit of work, and both commit together.
    """

    name: str
    #: The durable work queue it consumes; bound to the types its handlers take.
    queue: str
    handlers: HandlerSource
    #: The message types it consumes, when `handlers` is built from the parts (a mapping says so itself).
    consumes: tuple[type[Payload], ...] = ()
    #: Business tables it owns; `compensa db upgrade --app` creates them.
    tables: tuple[Table, ...] = ()
    #: Whether the simulator may break its handlers (injected transient and permanent errors).
    faulty: bool = True
    #: One batch in flight per process (handlers that lock rows many messages share).
    serial_batches: bool = False
    #: Takes a batch's row locks up front, in one order (`infra.pipeline.BatchLock`).
    lock_batch: Callable[..., Awaitable[None]] | None = None

    def handlers_from(self, parts: Any) -> Mapping[str, AppHandler]:
        """Its handlers by message type, built from the composition root's parts if they need them."""
        source = self.handlers
        return source if isinstance(source, Mapping) else source(parts)

    def message_types(self) -> tuple[str, ...]:
        """The types its queue is bound to."""
        if isinstance(self.handlers, Mapping):
            return tuple(self.handlers)
        return tuple(model.message_type for model in self.consumes)


@dataclass(frozen=True)
class PlannedSaga:
    """One saga of a simulated workload: its id, when it starts, and the message that starts it."""

    saga_id: str
    at_seconds: float
    start: Payload


@dataclass(frozen=True)
class Plan:
    """A workload: the sagas to start, and the rows the participants' tables begin with."""

    sagas: tuple[PlannedSaga, ...]
    #: Table name -> rows inserted before the first saga starts (inventory, accounts).
    rows: Mapping[str, Sequence[Mapping[str, Any]]] = field(default_factory=dict)


@dataclass(frozen=True)
class FinalState:
    """What a run left behind, for the app's invariants and coverage goals to judge."""

    plan: Plan
    #: Saga id -> status (`completed`, `cancelled`, `rejected`, `compensation_failed`, …).
    saga_status: Mapping[str, str]
    #: Table name -> every row of each participant table, as dicts.
    tables: Mapping[str, Sequence[Mapping[str, Any]]]

    def rows(self, table: Table | str) -> Sequence[Mapping[str, Any]]:
        return self.tables.get(table if isinstance(table, str) else table.name, ())


@dataclass(frozen=True)
class Goal:
    """A coverage ("sometimes") goal: a situation a run should reach at least once."""

    description: str
    #: How often the situation occurred in a run (0: not reached).
    count: Callable[[FinalState], int]


@dataclass(frozen=True)
class SimulationPieces:
    """What `compensa simulate --app` needs besides the app's handlers: work to do, and what must hold."""

    #: `(sagas, rng) -> Plan`: draw every saga up front from `rng`, so a seed replays the run.
    workload: Callable[[int, random.Random], Plan]
    #: The app's own invariants over the final state; compensa adds its own (every saga
    #: terminal, every outbox row published, every message consumed or dead-lettered).
    invariants: Callable[[FinalState], Sequence[Violation]]
    goals: Mapping[str, Goal] = field(default_factory=dict)


@dataclass(frozen=True)
class SagaApp:
    """A saga application: what `--app module:attr` names."""

    name: str
    sagas: tuple[SagaDefinition, ...]
    messages: tuple[type[Payload], ...]
    participants: tuple[Participant, ...]
    simulation: SimulationPieces | None = None
    #: The saga service's queues: replies and confirmations, and the messages that start sagas.
    #: Give an app its own names when it shares a broker with another app.
    saga_events_queue: str = "saga.events"
    saga_starts_queue: str = "saga.starts"
    #: The events that announce a saga's end (the simulator counts finished sagas by them).
    outcomes: tuple[type[Payload], ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        _check_app(self)

    def participant(self, name: str) -> Participant:
        for participant in self.participants:
            if participant.name == name:
                return participant
        raise KeyError(f"app {self.name!r} has no participant {name!r}")

    def starts(self) -> tuple[str, ...]:
        """The types that start a saga, in definition order."""
        return tuple(dict.fromkeys(d.starts_with.message_type for d in self.sagas))

    def replies(self) -> tuple[str, ...]:
        """Every other type the saga service consumes: replies and compensation confirmations."""
        starts = set(self.starts())
        handled = sorted({t for d in self.sagas for t in d.handled_types()} - starts)
        return tuple(handled)

    def tables(self) -> tuple[Table, ...]:
        return tuple(table for participant in self.participants for table in participant.tables)


def _check_app(app: SagaApp) -> None:
    """Refuse an app whose pieces do not fit together, at load time rather than on the first message."""
    if not _NAME.match(app.name):
        raise ValueError(f"app name {app.name!r} must be lower-case letters, digits and _ (at most 32)")
    if not app.sagas:
        raise ValueError(f"app {app.name!r} defines no saga")
    known = {model.message_type for model in app.messages}
    names = [p.name for p in app.participants]
    if len(set(names)) != len(names):
        raise ValueError(f"app {app.name!r} has duplicate participant names: {names}")
    queues = [app.saga_events_queue, app.saga_starts_queue, *(p.queue for p in app.participants)]
    if len(set(queues)) != len(queues):
        raise ValueError(f"app {app.name!r} uses one queue twice: {queues}")
    for queue in queues:
        if not _QUEUE.match(queue):
            raise ValueError(f"queue name {queue!r} must be lower-case letters, digits, _ and . (at most 100)")
    for participant in app.participants:
        if not _NAME.match(participant.name) or participant.name in RESERVED_SERVICES:
            raise ValueError(f"participant name {participant.name!r} is reserved or not lower-case letters, digits and _")
        types = participant.message_types()
        if not types:
            raise ValueError(f"participant {participant.name!r} consumes nothing (handlers built later need `consumes`)")
        unknown = sorted(set(types) - known)
        if unknown:
            raise ValueError(f"participant {participant.name!r} handles {', '.join(unknown)}, not among the app's messages")
        kinds = {model.kind for model in app.messages if model.message_type in types}
        if len(kinds) > 1:
            raise ValueError(f"participant {participant.name!r} mixes commands and events on one queue")
    for definition in app.sagas:
        sent = {s.command.message_type for s in definition.steps} | {
            s.compensation.command.message_type for s in definition.steps if s.compensation is not None
        }
        missing = sorted((sent | set(definition.handled_types())) - known)
        if missing:
            raise ValueError(f"saga {definition.name!r} uses {', '.join(missing)}, not among the app's messages")
        handled = {t for p in app.participants for t in p.message_types()}
        unanswered = sorted(sent - handled)
        if unanswered:
            raise ValueError(f"saga {definition.name!r} sends {', '.join(unanswered)}, which no participant handles")
