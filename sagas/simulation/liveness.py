"""Liveness: once the faults stop, every saga reaches an outcome within a bound.

Safety (invariants.py) says nothing bad ever happens; liveness says something good
eventually does. A liveness run stops injecting faults at `heal_at` (virtual seconds
from the start): partitions heal, silent participants answer again, the gateway
recovers. From then on (or from its start, if it starts later) every saga must end
completed, cancelled or rejected within `bound` seconds. `compensation_failed` is no
outcome here: it waits for an operator, and a saga that needs one is not live.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta

from sagas.definition import SagaDefinition
from sagas.simulation.faults import FaultRates
from sagas.simulation.invariants import Violation

OUTCOMES = frozenset({"completed", "cancelled", "rejected"})
INVARIANT = "liveness: every saga ends within the bound once faults stop"


def default_bound(
    definitions: Iterable[SagaDefinition],
    rates: FaultRates,
    *,
    retry_max_seconds: float,
    max_attempts: int,
    operator_after: float | None = None,
) -> float:
    """The longest a sound saga can take once faults stop, from its deadlines, in virtual seconds.

    A saga may still walk every step up to its deadline and then use every
    compensation attempt (plus one for the slack of re-arming); messages held in
    transit before the heal (silence, delay) come back, a broker restarted just before
    it comes back, and a delivery may go through every retry of its backoff. With the simulated operator on, one retry of a
    compensation_failed saga (its delay and another round of compensation attempts).
    """
    longest = 0.0
    compensating = 0.0
    for definition in definitions:
        steps = sum((step.deadline for step in definition.steps), timedelta())
        compensation = definition.compensation_deadline * (definition.max_compensation_attempts + 1)
        longest = max(longest, (steps + compensation).total_seconds())
        compensating = max(compensating, compensation.total_seconds())
    in_flight = max(rates.silence_seconds, rates.max_delay_seconds) + retry_max_seconds * max_attempts
    if rates.broker_restart > 0:
        # A restart that struck just before the heal still keeps the broker away.
        in_flight += rates.broker_restart_seconds + rates.broker_reconnect_seconds
    operator = operator_after + compensating if operator_after is not None else 0.0
    return round(longest + in_flight + operator, 3)


@dataclass(frozen=True)
class SagaTimes:
    """When a saga started and when it first reached an outcome (None: never), in virtual seconds."""

    started_at: float
    status: str | None
    ended_at: float | None


def check(times: Mapping[str, SagaTimes], *, heal_at: float, bound: float) -> list[Violation]:
    """Every saga that has no outcome, or reached it later than `bound` after the heal (or its start)."""
    found = []
    for saga_id, saga in sorted(times.items()):
        due = max(heal_at, saga.started_at) + bound
        if saga.status is None:
            found.append(Violation(INVARIANT, f"no saga started for the order (placed at {saga.started_at:.3f} s)", saga_id))
        elif saga.ended_at is None or saga.status not in OUTCOMES:
            found.append(
                Violation(
                    INVARIANT,
                    f"stuck {saga.status}: no outcome by the end of the run; due by {due:.3f} s "
                    f"(faults stopped at {heal_at:.3f} s, bound {bound:g} s)",
                    saga_id,
                )
            )
        elif saga.ended_at > due:
            found.append(
                Violation(
                    INVARIANT,
                    f"{saga.status} at {saga.ended_at:.3f} s, due by {due:.3f} s "
                    f"(faults stopped at {heal_at:.3f} s, bound {bound:g} s)",
                    saga_id,
                )
            )
    return found
