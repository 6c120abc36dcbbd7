"""The orchestrator: apply saga transitions and persist them with their commands, atomically."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from sqlalchemy.ext.asyncio import AsyncConnection

from contracts import BusinessRuleError, Message, Payload
from sagas import engine
from sagas.definition import SagaDefinition
from sagas.state import Deadline, SagaState, SagaStatus, Transition
from sagas.store import SagaStore, history_entry

log = structlog.get_logger("compensa.saga")
tracer = trace.get_tracer("compensa")

SERVICE = "saga"


class SagaUnitOfWork(Protocol):
    """What the orchestrator needs from a unit of work (outbox.UnitOfWork fits)."""

    @property
    def connection(self) -> AsyncConnection: ...

    def now(self) -> datetime: ...

    def send(self, payload: Payload, *, correlation_id: str | None = None) -> Message[Any]: ...

    def after_commit(self, callback: Callable[[], None]) -> None: ...


class SagaTransaction(SagaUnitOfWork, Protocol):
    """A unit of work the orchestrator opens and commits itself (the deadline sweep)."""

    async def __aenter__(self) -> SagaTransaction: ...

    async def __aexit__(self, *exc_info: object) -> None: ...

    async def commit(self) -> None: ...

    async def trace_context_of(self, correlation_id: str) -> otel_context.Context | None: ...


@dataclass(frozen=True)
class AppliedTransition:
    """A transition the orchestrator stored, as observers (metrics) see it."""

    definition: SagaDefinition
    before: SagaState | None
    after: SagaState
    trigger: str
    #: When the saga began compensating, for a saga that ends now after compensating.
    compensation_started_at: datetime | None = None


#: Called once the transaction holding a stored transition has committed; must not block.
TransitionObserver = Callable[[AppliedTransition], None]


class Orchestrator:
    """Route saga events to their saga definition and store what the engine decides."""

    def __init__(self, definitions: Sequence[SagaDefinition], observers: Sequence[TransitionObserver] = ()) -> None:
        self.observers = tuple(observers)
        self.definitions = {d.name: d for d in definitions}
        self._starters = {d.starts_with.message_type: d for d in definitions}
        self._interested: dict[str, list[SagaDefinition]] = {}
        for definition in definitions:
            for message_type in definition.handled_types():
                self._interested.setdefault(message_type, []).append(definition)

    def handled_types(self) -> frozenset[str]:
        return frozenset(self._interested)

    def handlers(self) -> dict[str, Any]:
        """One handler per consumed message type, for the consumer pipeline."""
        return dict.fromkeys(self._interested, self.handle)

    async def handle(self, uow: SagaUnitOfWork, message: Message[Any]) -> None:
        """Apply one saga event: start a saga or move an existing one."""
        store = SagaStore(uow.connection)
        saga_id = message.correlation_id
        state = await store.get(saga_id)
        if state is None:
            definition = self._starters.get(message.type)
            if definition is None:
                raise BusinessRuleError(f"{message.type} for unknown saga {saga_id!r}")
            transition = engine.start(definition, message.payload, saga_id, uow.now())
            await self._apply(uow, store, transition, None, message)
            return
        if message.type in self._starters:
            # One saga per business key: a second start (another producer reusing an
            # order id, say) must not touch the saga that owns it, nor slip by unseen.
            raise BusinessRuleError(
                f"{message.type} for {saga_id!r}, which already has a saga ({state.status.value}): one saga per business key"
            )
        definition = self.definitions[state.definition]
        transition = engine.on_message(definition, state, message.payload, uow.now())
        await self._apply(uow, store, transition, state, message)

    async def fire_deadline(
        self, uow: SagaTransaction, state: SagaState, deadline: Deadline, sweep: trace.Span | None = None
    ) -> Transition:
        """Apply a due deadline to the saga claimed with it; a stale one (saga moved on) is cleared.

        `state` comes from the claim (`SagaStore.due_deadlines`), which holds the saga's
        row (SQLite: the database's write lock): nothing moves the saga before this
        transaction ends. A deadline that fires does so in its saga's trace, linked to
        the `sweep` span that found it.
        """
        store = SagaStore(uow.connection)
        definition = self.definitions[state.definition]
        transition = engine.on_deadline(definition, state, deadline, uow.now())
        if not transition.changed:
            # The deadline no longer guards anything: clear it, or the sweep claims it forever.
            await store.clear_deadline(state)
            return transition
        with await self._in_saga_trace(uow, state, sweep):
            await self._apply(uow, store, transition, state, None)
        return transition

    async def sweep_deadlines(self, begin: Callable[[], SagaTransaction], limit: int = 100) -> int:
        """Fire up to `limit` due deadlines in one transaction opened by `begin()`; return how many fired.

        The due sagas are claimed with SKIP LOCKED, so several sweepers share the work
        and a saga whose reply is being applied waits for the next round.
        """
        async with begin() as uow:
            due = await SagaStore(uow.connection).due_deadlines(uow.now(), limit)
            if not due:
                return 0
            # A span only for a sweep that fires: an idle sweep every second is no trace.
            with tracer.start_as_current_span("saga.fire_deadlines", attributes={"compensa.deadlines": len(due)}) as sweep:
                for state, deadline in due:
                    with structlog.contextvars.bound_contextvars(saga_id=state.saga_id):
                        await self.fire_deadline(uow, state, deadline, sweep)
                await uow.commit()
        return len(due)

    async def _in_saga_trace(self, uow: SagaTransaction, state: SagaState, sweep: trace.Span | None) -> Any:
        """A span for one fired deadline in its saga's own trace, linked to the sweep.

        One trace per saga: the compensations a timeout sends continue the trace the
        order began, found in the saga's newest outgoing message.
        """
        return tracer.start_as_current_span(
            "saga.deadline",
            context=await uow.trace_context_of(state.saga_id),
            links=[trace.Link(sweep.get_span_context())] if sweep is not None else None,
            attributes={"compensa.saga_id": state.saga_id, "compensa.saga.type": state.definition},
        )

    async def retry_compensation(self, uow: SagaUnitOfWork, saga_id: str) -> Transition:
        store = SagaStore(uow.connection)
        state = await store.get(saga_id)
        if state is None:
            raise BusinessRuleError(f"no saga {saga_id!r}")
        if state.status is not SagaStatus.COMPENSATION_FAILED:
            raise BusinessRuleError(f"saga {saga_id} is {state.status.value}, not compensation_failed")
        transition = engine.retry_compensation(self.definitions[state.definition], state, uow.now())
        await self._apply(uow, store, transition, state, None)
        return transition

    async def cancel(self, uow: SagaUnitOfWork, saga_id: str, reason: str) -> Transition:
        """Cancel a running saga by hand: compensate what it did (see engine.cancel)."""
        store = SagaStore(uow.connection)
        state = await store.get(saga_id)
        if state is None:
            raise BusinessRuleError(f"no saga {saga_id!r}")
        transition = engine.cancel(self.definitions[state.definition], state, uow.now(), reason)
        if not transition.changed:
            raise BusinessRuleError(f"saga {saga_id}: {transition.note}")
        await self._apply(uow, store, transition, state, None)
        return transition

    async def _apply(
        self,
        uow: SagaUnitOfWork,
        store: SagaStore,
        transition: Transition,
        before: SagaState | None,
        message: Message[Any] | None,
    ) -> None:
        if not transition.changed:
            log.info("saga.ignored", saga_id=transition.state.saga_id, trigger=transition.trigger, note=transition.note)
            return
        new = transition.state
        sent = []
        for payload in transition.outgoing:
            outgoing = uow.send(payload, correlation_id=new.saga_id)
            sent.append({"type": outgoing.type, "message_id": str(outgoing.message_id)})
        definition = self.definitions[new.definition]
        step = definition.steps[new.step].name if 0 <= new.step < len(definition.steps) else None
        history = history_entry(
            new,
            from_status=before.status if before else None,
            trigger=transition.trigger,
            note=transition.note,
            step=step,
            message_id=str(message.message_id) if message else None,
            causation_id=str(message.envelope.causation_id) if message and message.envelope.causation_id else None,
            sent=sent,
        )
        # State, deadline and history in one write: INSERT for a start, UPDATE (version-checked) after.
        await store.write(new, transition.deadline, history, expected_version=before.version if before else None)
        _annotate_span(before, new, transition.trigger, step)
        if self.observers:
            await self._observe(uow, store, definition, before, new, transition.trigger)
        log.info(
            "saga.transition",
            saga_id=new.saga_id,
            trigger=transition.trigger,
            from_status=before.status.value if before else None,
            to_status=new.status.value,
            note=transition.note,
            sent=[s["type"] for s in sent],
        )

    async def _observe(
        self,
        uow: SagaUnitOfWork,
        store: SagaStore,
        definition: SagaDefinition,
        before: SagaState | None,
        after: SagaState,
        trigger: str,
    ) -> None:
        started = None
        if after.is_terminal and before is not None and before.status is SagaStatus.COMPENSATING:
            started = await store.compensation_started_at(after.saga_id)
        applied = AppliedTransition(definition, before, after, trigger, started)

        def notify() -> None:
            for observer in self.observers:
                try:
                    observer(applied)
                except Exception:
                    log.exception("saga.observer_failed", saga_id=after.saga_id, observer=repr(observer))

        # After commit: a transition rolled back (a batch reprocessed one by one, a lost
        # connection rerun) is observed only when it is stored for good, so counted once.
        uow.after_commit(notify)


def _annotate_span(before: SagaState | None, after: SagaState, trigger: str, step: str | None) -> None:
    """The transition as an event of the span handling it (a no-op when it is not recorded)."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    span.set_attribute("compensa.saga.type", after.definition)
    span.set_attribute("compensa.saga.status", after.status.value)
    span.add_event(
        "saga.transition",
        {
            "compensa.saga.trigger": trigger,
            "compensa.saga.from_status": before.status.value if before else "",
            "compensa.saga.to_status": after.status.value,
            "compensa.saga.step": step or "",
        },
    )
    if after.status is SagaStatus.COMPENSATING and (before is None or before.status is not SagaStatus.COMPENSATING):
        span.add_event(
            "saga.compensation_started",
            {"compensa.saga.reason": after.reason or "", "compensa.saga.pending": list(after.pending_compensations)},
        )
