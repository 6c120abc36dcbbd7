"""Coverage ("sometimes") goals: situations a run should reach at least once.

The invariants say what must *always* hold; these say what must *sometimes* happen,
so a suite knows its seeds reach the paths that matter. Each goal is counted from
what a run observed: saga history triggers and notes, pipeline counters, the
broker's and the simulated operator's tallies, circuit breaker transitions, the
faults injected.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

#: goal -> what it means (the report and the error for an unmet goal quote this).
GOALS: dict[str, str] = {
    "deadline_mid_step": "a step deadline fired while the step was in progress",
    "late_reply_undone": "a reply that came after its step gave up was compensated",
    "compensation_failed": "a saga reached compensation_failed and the operator's retry moved it on",
    "duplicate_skipped": "the inbox skipped a delivery it had already applied",
    "dead_letter_replayed": "a dead-lettered command was replayed by the operator",
    "breaker_opened": "the payment gateway's circuit breaker opened",
    "broker_restarted": "the broker restarted under an unacknowledged delivery, which came back redelivered",
    "commit_outcome_unknown": "a commit reported as failed had reached the database, and the message ran again",
    "clock_jumped": "the clock jumped forward while a delivery was in flight",
    "fault_burst": "a fault came in a burst of its kind",
}


@dataclass(frozen=True)
class HistoryCounts:
    """What the saga histories of a run show, counted (one query's worth, see readback.py)."""

    step_deadlines: int = 0
    late_replies_undone: int = 0
    compensation_failed: int = 0
    #: Sagas that reached compensation_failed and were then retried by the operator.
    compensation_failed_retried: int = 0


def unknown_goals(names: Iterable[str]) -> list[str]:
    return sorted(set(names) - set(GOALS))


def observed(
    history: HistoryCounts,
    counters: Mapping[str, int],
    breakers: Mapping[str, Mapping[str, object]],
    commands_replayed: int,
    faults: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """How often each goal's situation occurred in one run (0: not reached)."""
    opened = 0
    for breaker in breakers.values():
        value = breaker.get("opened", 0)
        opened += value if isinstance(value, int) else 0
    faults = faults or {}
    return {
        "deadline_mid_step": history.step_deadlines,
        "late_reply_undone": history.late_replies_undone,
        "compensation_failed": history.compensation_failed_retried,
        "duplicate_skipped": int(counters.get("duplicates_skipped", 0)),
        "dead_letter_replayed": commands_replayed,
        "breaker_opened": opened,
        "broker_restarted": int(counters.get("returned_on_restart", 0)),
        "commit_outcome_unknown": int(faults.get("commit_unknown_durable", 0)),
        "clock_jumped": int(faults.get("clock_jump", 0)),
        "fault_burst": int(faults.get("burst", 0)),
    }


def unmet(required: Iterable[str], reached: Mapping[str, int]) -> list[str]:
    """The required goals a run (or a swarm, summed) never reached, in the order given."""
    return [goal for goal in dict.fromkeys(required) if not reached.get(goal)]


def unmet_message(goals: Iterable[str], app_goals: Mapping[str, str] | None = None) -> str:
    """One sentence naming each unmet goal and what it means (`app_goals`: the hosted app's, described)."""
    described = {**GOALS, **(app_goals or {})}
    named = "; ".join(f"{goal} ({described[goal]})" for goal in goals)
    return f"coverage goals not reached: {named}"
