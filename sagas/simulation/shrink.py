"""Shrinking: reduce a failing run to the smallest one that still fails.

Greedy, like a property-based testing library's shrinker: fewer sagas first (a
smaller run is the biggest saving to whoever reads its history), then each fault
switched off, then each remaining rate halved, over and over until no step helps or
the budget of runs is spent. The seed stays: a run is the seed *and* its options,
and a smaller run of the same seed is still a different run, which is why every
candidate is run again rather than guessed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from sagas.simulation.faults import RATE_NAMES

#: A rate halved below this is switched off instead.
SMALLEST_RATE = 0.0005
#: A fault's settings that mean nothing once the fault is off.
COMPANIONS = {
    "gateway_outage": ("gateway_outage_seconds",),
    "silence": ("silence_seconds",),
    "delay": ("max_delay_seconds",),
    "broker_restart": ("broker_restart_seconds", "broker_reconnect_seconds"),
    "clock_jump": ("clock_jump_seconds",),
    "burst": ("burst_seconds",),
}


@dataclass(frozen=True)
class Candidate:
    """A run's size and fault fields (every field that differs from no faults at all)."""

    sagas: int
    faults: tuple[tuple[str, float], ...]

    @classmethod
    def of(cls, sagas: int, faults: Mapping[str, float]) -> Candidate:
        return cls(sagas, tuple(sorted(faults.items())))

    @property
    def rates(self) -> dict[str, float]:
        return dict(self.faults)

    def size(self) -> tuple[int, int, float]:
        """Smaller is simpler: sagas, then faults on, then the sum of their rates."""
        rates = self.rates
        on = [name for name in RATE_NAMES if rates.get(name)]
        return (self.sagas, len(on), round(sum(rates[name] for name in on), 6))


@dataclass
class Shrunk:
    candidate: Candidate
    runs: int
    #: Each accepted step, in order ("sagas 60 -> 30", "without duplicate", ...).
    steps: list[str] = field(default_factory=list)


def _smaller(current: Candidate) -> Iterator[tuple[str, Candidate]]:
    rates = current.rates
    for sagas in dict.fromkeys((1, current.sagas // 4, current.sagas // 2, current.sagas * 3 // 4)):
        if 1 <= sagas < current.sagas:
            yield f"sagas {current.sagas} -> {sagas}", Candidate(sagas, current.faults)
    for name in RATE_NAMES:
        if rates.get(name):
            fewer = {k: v for k, v in rates.items() if k != name and k not in COMPANIONS.get(name, ())}
            yield f"without {name}", Candidate.of(current.sagas, fewer)
    for name in RATE_NAMES:
        if rates.get(name):
            half = round(rates[name] / 2, 4)
            if half >= SMALLEST_RATE:
                yield f"{name} {rates[name]:g} -> {half:g}", Candidate.of(current.sagas, {**rates, name: half})


def shrink(start: Candidate, still_fails: Callable[[Candidate], bool], *, budget: int = 40) -> Shrunk:
    """The smallest candidate reachable from `start` for which `still_fails` holds.

    `still_fails(start)` is assumed (the caller saw it fail); at most `budget`
    candidates are run.
    """
    result = Shrunk(start, runs=0)
    tried: set[Candidate] = {start}
    improved = True
    while improved and result.runs < budget:
        improved = False
        for step, candidate in _smaller(result.candidate):
            if candidate in tried or candidate.size() >= result.candidate.size():
                continue
            if result.runs >= budget:
                break
            tried.add(candidate)
            result.runs += 1
            if still_fails(candidate):
                result.candidate = candidate
                result.steps.append(step)
                improved = True
                break
    return result
