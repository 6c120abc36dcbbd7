"""The pure saga transition engine: state + message (or deadline) -> transition.

No I/O, no clock, no randomness: the caller passes `now` and persists the result.
The rule that shapes everything here: no money or stock may leak under any
ordering. So every step whose success we have seen is either part of a completed
saga or has its compensation sent, and a step that timed out is compensated too,
because it may have happened. Participants confirm a compensation for something
that never happened as a void, so confirmations always come back.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime
from typing import Any

from contracts.messages import Payload
from sagas.definition import Compensation, SagaData, SagaDefinition, Step
from sagas.state import Deadline, SagaState, SagaStatus, Transition

RETRY_TRIGGER = "operator:retry_compensation"
CANCEL_TRIGGER = "operator:cancel"

_COMPENSATION_OPEN = (SagaStatus.COMPENSATING, SagaStatus.COMPENSATION_FAILED)


# ---------------------------------------------------------------- entry points


def start(definition: SagaDefinition, message_payload: Payload, saga_id: str, now: datetime) -> Transition:
    """Start a saga from its first message: send the first step's command."""
    if message_payload.message_type != definition.starts_with.message_type:
        raise ValueError(
            f"{definition.name} starts with {definition.starts_with.message_type}, not {message_payload.message_type}"
        )
    first = definition.steps[0]
    data = dict(definition.initial_data(message_payload))
    state = SagaState(
        saga_id=saga_id,
        definition=definition.name,
        status=SagaStatus.RUNNING,
        step=0,
        data=data,
        done_steps=(),
        pending_compensations=(),
        compensation_attempts=0,
        reason=None,
        version=1,
        started_at=now,
        updated_at=now,
    )
    return Transition(
        state=state,
        outgoing=(first.command_for(data),),
        deadline=_step_deadline(first, now),
        trigger=message_payload.message_type,
        note=f"started -> {first.name}",
        changed=True,
    )


def on_message(definition: SagaDefinition, state: SagaState, payload: Payload, now: datetime) -> Transition:
    """Apply a participant's reply (or any other message) to a saga."""
    _check_belongs(definition, state)
    message_type = payload.message_type
    compensation = definition.compensation_confirmed_by(message_type)
    if compensation is not None:
        return _on_confirmation(definition, state, compensation, message_type, now)
    step = definition.step_replying_with(message_type)
    if step is None:
        return _ignored(state, message_type, f"{message_type} is not a reply {definition.name} awaits")
    if message_type == step.success.message_type:
        return _on_success(definition, state, step, payload, now)
    return _on_failure(definition, state, step, payload, now)


def on_deadline(definition: SagaDefinition, state: SagaState, deadline: Deadline, now: datetime) -> Transition:
    """Apply a fired deadline; one that no longer guards anything is ignored."""
    _check_belongs(definition, state)
    trigger = f"deadline:{deadline.kind}:{deadline.step}"
    if not _is_live(definition, state, deadline):
        return _ignored(state, trigger, f"stale deadline (saga is {state.status})")
    if deadline.kind == "step":
        return _on_step_timeout(definition, state, now, trigger)
    return _on_compensation_timeout(definition, state, now, trigger)


def retry_compensation(definition: SagaDefinition, state: SagaState, now: datetime) -> Transition:
    """Resend the pending compensations of a compensation_failed saga (operator action)."""
    _check_belongs(definition, state)
    if state.status is not SagaStatus.COMPENSATION_FAILED:
        return _ignored(state, RETRY_TRIGGER, f"saga is {state.status}, not compensation_failed")
    if not state.pending_compensations:
        return _cancel(definition, state, now, RETRY_TRIGGER, "nothing left to compensate")
    return _changed(
        state,
        now,
        trigger=RETRY_TRIGGER,
        note=f"operator retry -> resend {', '.join(state.pending_compensations)}",
        outgoing=_pending_commands(definition, state),
        deadline=_compensation_deadline(definition, state, now, attempt=1),
        status=SagaStatus.COMPENSATING,
        compensation_attempts=1,
    )


def cancel(definition: SagaDefinition, state: SagaState, now: datetime, reason: str) -> Transition:
    """Stop a running saga by hand (operator action): undo what it did, as a timeout would.

    The current step's command was sent and may have taken effect, so it is undone
    too; a reply that arrives later is undone like any late reply. A saga already
    compensating goes on as it is; a finished one stays finished (a completed order
    is not cancelled by compensation).
    """
    _check_belongs(definition, state)
    if state.status is not SagaStatus.RUNNING:
        return _ignored(state, CANCEL_TRIGGER, f"saga is {state.status.value}: only a running saga can be cancelled")
    return _compensate(
        definition,
        state,
        (*_done_in_order(definition, state), _current(definition, state)),
        reason=f"cancelled by operator: {reason}",
        now=now,
        trigger=CANCEL_TRIGGER,
        cause="operator cancel",
    )


# ---------------------------------------------------------------- replies


def _on_success(definition: SagaDefinition, state: SagaState, step: Step, payload: Payload, now: datetime) -> Transition:
    """Advance on the current step's success; undo a success that came too late."""
    trigger = payload.message_type
    if step.name in state.done_steps:
        return _ignored(state, trigger, f"duplicate {trigger}: {step.name} already succeeded")
    if state.status is SagaStatus.RUNNING:
        if step.name == _current(definition, state).name:
            return _advance(definition, state, step, payload, now)
        # Its command was never sent: nothing of ours happened.
        return _ignored(state, trigger, f"unexpected {trigger}: {step.name} has not started")
    if state.status is SagaStatus.COMPLETED:
        return _ignored(state, trigger, f"{trigger} after completion")
    return _undo_late_success(definition, state, step, payload, now)


def _advance(definition: SagaDefinition, state: SagaState, step: Step, payload: Payload, now: datetime) -> Transition:
    """Record the current step's success and send the next command, or complete."""
    trigger = payload.message_type
    data = step.data_after(state.data, payload)
    done_steps = (*state.done_steps, step.name)
    next_index = state.step + 1
    if next_index == len(definition.steps):
        return _changed(
            state,
            now,
            trigger=trigger,
            note=f"{step.name} succeeded -> completed",
            outgoing=(definition.completed(data),),
            deadline=None,
            status=SagaStatus.COMPLETED,
            data=data,
            done_steps=done_steps,
        )
    next_step = definition.steps[next_index]
    return _changed(
        state,
        now,
        trigger=trigger,
        note=f"{step.name} succeeded -> {next_step.name}",
        outgoing=(next_step.command_for(data),),
        deadline=_step_deadline(next_step, now),
        step=next_index,
        data=data,
        done_steps=done_steps,
    )


def _undo_late_success(definition: SagaDefinition, state: SagaState, step: Step, payload: Payload, now: datetime) -> Transition:
    """Compensate a step that succeeded after the saga gave up on it.

    The compensation is sent even if one went out already (the step timed out,
    say): it may have reached the participant before the step's own command, and
    compensations are idempotent. Marking the step done makes a repeat a duplicate.
    """
    trigger = payload.message_type
    if step.compensation is None:
        return _ignored(state, trigger, f"late {trigger}: {step.name} has nothing to undo")
    data = step.data_after(state.data, payload)  # the undo may need the reply's ids
    command = step.compensation.command_for(data)
    pending = state.pending_compensations
    if state.status in _COMPENSATION_OPEN and command.message_type not in pending:
        # Still waiting for confirmations: wait for this one too.
        pending = (*pending, command.message_type)
    return _changed(
        state,
        now,
        trigger=trigger,
        note=f"late {trigger} while {state.status} -> {command.message_type}",
        outgoing=(command,),
        deadline=_rearmed_deadline(definition, state, now),
        data=data,
        done_steps=(*state.done_steps, step.name),
        pending_compensations=pending,
    )


def _on_failure(definition: SagaDefinition, state: SagaState, step: Step, payload: Payload, now: datetime) -> Transition:
    """Fail the saga on the current step's failure; any other failure changes nothing."""
    trigger = payload.message_type
    is_current = state.status is SagaStatus.RUNNING and step.name == _current(definition, state).name
    if not is_current:
        # A failure reply means the step did not happen, so there is nothing to undo.
        return _ignored(state, trigger, f"{trigger} ignored: {step.name} not in progress")
    reason = _failure_reason(payload)
    if not state.done_steps:
        return _changed(
            state,
            now,
            trigger=trigger,
            note=f"{step.name} failed -> rejected",
            outgoing=(definition.rejected(state.data, reason),),
            deadline=None,
            status=SagaStatus.REJECTED,
            reason=reason,
        )
    return _compensate(
        definition,
        state,
        _done_in_order(definition, state),
        reason=reason,
        now=now,
        trigger=trigger,
        cause=f"{step.name} failed",
    )


def _on_confirmation(
    definition: SagaDefinition,
    state: SagaState,
    compensation: Compensation,
    trigger: str,
    now: datetime,
) -> Transition:
    """Tick off a confirmed compensation; cancel the saga when none is left."""
    command_type = compensation.command_type
    if state.status not in _COMPENSATION_OPEN or command_type not in state.pending_compensations:
        return _ignored(state, trigger, f"{trigger} ignored: no {command_type} pending")
    pending = tuple(t for t in state.pending_compensations if t != command_type)
    if not pending:
        # Also heals a compensation_failed saga whose confirmation was merely slow.
        return _cancel(definition, state, now, trigger, f"{command_type} confirmed")
    return _changed(
        state,
        now,
        trigger=trigger,
        note=f"{command_type} confirmed; waiting for {', '.join(pending)}",
        outgoing=(),
        deadline=_rearmed_deadline(definition, state, now),
        pending_compensations=pending,
    )


# ---------------------------------------------------------------- deadlines


def _is_live(definition: SagaDefinition, state: SagaState, deadline: Deadline) -> bool:
    """Whether this deadline still guards what the saga is waiting for."""
    step_name = _current(definition, state).name
    if deadline.kind == "step":
        return state.status is SagaStatus.RUNNING and deadline.step == step_name and deadline.attempt == 1
    return (
        state.status is SagaStatus.COMPENSATING and deadline.step == step_name and deadline.attempt == state.compensation_attempts
    )


def _on_step_timeout(definition: SagaDefinition, state: SagaState, now: datetime, trigger: str) -> Transition:
    """Give up on the current step; undo it too, since it may have happened."""
    step = _current(definition, state)
    return _compensate(
        definition,
        state,
        (*_done_in_order(definition, state), step),
        reason=f"deadline: {step.name}",
        now=now,
        trigger=trigger,
        cause=f"{step.name} timed out",
    )


def _on_compensation_timeout(definition: SagaDefinition, state: SagaState, now: datetime, trigger: str) -> Transition:
    """Resend unconfirmed compensations, or give up after the last attempt."""
    pending = ", ".join(state.pending_compensations)
    attempts, budget = state.compensation_attempts, definition.max_compensation_attempts
    if attempts >= budget:
        return _changed(
            state,
            now,
            trigger=trigger,
            note=f"{pending} unconfirmed after {attempts} attempts -> compensation_failed",
            outgoing=(),
            deadline=None,
            status=SagaStatus.COMPENSATION_FAILED,
        )
    attempt = attempts + 1
    return _changed(
        state,
        now,
        trigger=trigger,
        note=f"{pending} unconfirmed -> resend (attempt {attempt}/{budget})",
        outgoing=_pending_commands(definition, state),
        deadline=_compensation_deadline(definition, state, now, attempt),
        compensation_attempts=attempt,
    )


def _step_deadline(step: Step, now: datetime) -> Deadline:
    return Deadline(due_at=now + step.deadline, kind="step", step=step.name, attempt=1)


def _compensation_deadline(definition: SagaDefinition, state: SagaState, now: datetime, attempt: int) -> Deadline:
    return Deadline(
        due_at=now + definition.compensation_deadline,
        kind="compensation",
        step=_current(definition, state).name,
        attempt=attempt,
    )


def _rearmed_deadline(definition: SagaDefinition, state: SagaState, now: datetime) -> Deadline | None:
    """The deadline after progress in a compensation: the timer restarts.

    The state does not store the due time, so progress re-arms it with the same
    attempt number; a terminal or compensation_failed saga has no deadline.
    """
    if state.status is SagaStatus.COMPENSATING:
        return _compensation_deadline(definition, state, now, state.compensation_attempts)
    return None


# ---------------------------------------------------------------- compensation


def _compensate(
    definition: SagaDefinition,
    state: SagaState,
    steps_to_undo: Iterable[Step],
    *,
    reason: str,
    now: datetime,
    trigger: str,
    cause: str,
) -> Transition:
    """Start compensating these steps, newest first; cancel if none can be undone."""
    commands = _compensation_commands(reversed(tuple(steps_to_undo)), state.data)
    if not commands:
        failed = replace(state, reason=reason)
        return _cancel(definition, failed, now, trigger, f"{cause}, nothing to undo")
    pending = tuple(c.message_type for c in commands)
    return _changed(
        state,
        now,
        trigger=trigger,
        note=f"{cause} -> compensating: {', '.join(pending)}",
        outgoing=commands,
        deadline=_compensation_deadline(definition, state, now, attempt=1),
        status=SagaStatus.COMPENSATING,
        pending_compensations=pending,
        compensation_attempts=1,
        reason=reason,
    )


def _compensation_commands(steps_newest_first: Iterable[Step], data: SagaData) -> tuple[Payload, ...]:
    """Build each step's compensation once per command type (one release undoes both
    the reservation and the commit)."""
    commands: dict[str, Payload] = {}
    for step in steps_newest_first:
        if step.compensation is not None and step.compensation.command_type not in commands:
            commands[step.compensation.command_type] = step.compensation.command_for(data)
    return tuple(commands.values())


def _pending_commands(definition: SagaDefinition, state: SagaState) -> tuple[Payload, ...]:
    return tuple(
        definition.compensation_for(command_type).command_for(state.data) for command_type in state.pending_compensations
    )


def _cancel(definition: SagaDefinition, state: SagaState, now: datetime, trigger: str, cause: str) -> Transition:
    reason = state.reason or cause
    return _changed(
        state,
        now,
        trigger=trigger,
        note=f"{cause} -> cancelled",
        outgoing=(definition.cancelled(state.data, reason),),
        deadline=None,
        status=SagaStatus.CANCELLED,
        pending_compensations=(),
        reason=reason,
    )


# ---------------------------------------------------------------- helpers


def _current(definition: SagaDefinition, state: SagaState) -> Step:
    return definition.steps[state.step]


def _done_in_order(definition: SagaDefinition, state: SagaState) -> tuple[Step, ...]:
    return tuple(step for step in definition.steps if step.name in state.done_steps)


def _failure_reason(payload: Payload) -> str:
    detail = getattr(payload, "reason", None)
    return f"{payload.message_type}: {detail}" if detail else payload.message_type


def _check_belongs(definition: SagaDefinition, state: SagaState) -> None:
    if state.definition != definition.name:
        raise ValueError(f"saga {state.saga_id} is a {state.definition}, not a {definition.name}")


def _changed(
    state: SagaState,
    now: datetime,
    *,
    trigger: str,
    note: str,
    outgoing: tuple[Payload, ...],
    deadline: Deadline | None,
    **changes: Any,
) -> Transition:
    new_state = replace(state, version=state.version + 1, updated_at=now, **changes)
    return Transition(new_state, outgoing, deadline, trigger, note, changed=True)


def _ignored(state: SagaState, trigger: str, note: str) -> Transition:
    return Transition(state, (), None, trigger, note, changed=False)
