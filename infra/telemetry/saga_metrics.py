"""Saga metrics from the transitions the orchestrator stores (an orchestrator observer)."""

from __future__ import annotations

from infra.telemetry import instruments
from sagas.orchestrator import AppliedTransition
from sagas.state import SagaStatus

DEADLINE_PREFIX = "deadline:"


def step_outcome(applied: AppliedTransition) -> str | None:
    """How the step in progress ended with this transition, or None if it goes on (or none was)."""
    before, after = applied.before, applied.after
    if before is None or before.status is not SagaStatus.RUNNING:
        return None
    if applied.trigger.startswith(DEADLINE_PREFIX):
        return "timed_out"
    if after.status is SagaStatus.RUNNING:
        return "succeeded" if after.step != before.step else None
    return "succeeded" if after.status is SagaStatus.COMPLETED else "failed"


def record_saga_metrics(applied: AppliedTransition) -> None:
    before, after = applied.before, applied.after
    saga_type = after.definition
    if before is None:
        instruments.sagas_started.add(1, {"saga_type": saga_type})
    outcome = step_outcome(applied)
    if outcome is not None and before is not None:
        steps = applied.definition.steps
        step = steps[before.step].name if 0 <= before.step < len(steps) else ""
        instruments.saga_step_duration.record(
            (after.updated_at - before.updated_at).total_seconds(),
            {"saga_type": saga_type, "step": step, "outcome": outcome},
        )
    if applied.trigger.startswith(DEADLINE_PREFIX):
        kind = applied.trigger[len(DEADLINE_PREFIX) :].split(":", 1)[0]
        instruments.saga_deadlines_fired.add(1, {"saga_type": saga_type, "kind": kind})
    if after.is_terminal and (before is None or before.status is not after.status):
        labels = {"saga_type": saga_type, "status": after.status.value}
        instruments.saga_outcomes.add(1, labels)
        instruments.saga_duration.record((after.updated_at - after.started_at).total_seconds(), labels)
        if applied.compensation_started_at is not None:
            instruments.saga_compensation_duration.record(
                (after.updated_at - applied.compensation_started_at).total_seconds(), labels
            )
