"""The event trace of a run, for the determinism self-check.

A traced run records every delivery, publish, saga transition, fault-free heal and
operator action in the order it happened, each with its virtual time. Two runs of
one seed must record the same trace; the first index where they differ says where
something outside the seed (a global RNG, the wall clock, dict order of a set of
objects) crept in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: (virtual seconds, kind, details...): plain values only, so two runs compare by ==.
Event = tuple[Any, ...]


def digest(events: Sequence[Event]) -> str:
    """A SHA-256 over the whole trace, in order."""
    hasher = hashlib.sha256()
    for event in events:
        hasher.update(repr(event).encode())
        hasher.update(b"\n")
    return hasher.hexdigest()


def describe(event: Event | None) -> str:
    if event is None:
        return "(the trace ended here)"
    at, kind, *details = event
    return f"{at:.6f} s {kind} " + " ".join(str(d) for d in details)


@dataclass(frozen=True)
class Divergence:
    index: int
    first: Event | None
    second: Event | None

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "first": describe(self.first), "second": describe(self.second)}


def first_divergence(first: Sequence[Event], second: Sequence[Event]) -> Divergence | None:
    """Where two traces first differ (one ending early counts), or None when they are equal."""
    for index, (a, b) in enumerate(zip(first, second, strict=False)):
        if a != b:
            return Divergence(index, a, b)
    if len(first) != len(second):
        index = min(len(first), len(second))
        return Divergence(index, first[index] if index < len(first) else None, second[index] if index < len(second) else None)
    return None
