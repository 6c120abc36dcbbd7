"""Fault profiles for the simulator: every fault has a rate, every draw is seeded."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class FaultRates:
    #: The broker delivers a message twice.
    duplicate: float = 0.0
    #: The ack is lost after the effect committed: the message comes back, redelivered.
    lost_ack: float = 0.0
    #: A message other than the head of its queue is delivered next.
    reorder: float = 0.0
    #: A message is held back in transit for up to `max_delay_seconds`.
    delay: float = 0.0
    #: The relay dies after the broker confirmed a batch, before marking it sent.
    relay_crash: float = 0.0
    #: The consumer dies after its transaction committed, before it acked.
    consumer_crash: float = 0.0
    #: A participant handler fails transiently (retried through the delay queue).
    transient_error: float = 0.0
    #: A participant handler fails permanently (dead-lettered; the saga's deadline copes).
    permanent_error: float = 0.0
    #: A participant stays silent past the step deadline, then answers late.
    silence: float = 0.0
    #: A payment gateway call starts an outage: every call fails transiently for
    #: `gateway_outage_seconds`, then the gateway recovers (the circuit breaker opens and closes).
    gateway_outage: float = 0.0
    #: The broker restarts while a delivery is in flight: every unacked delivery returns to
    #: its queue (redelivered), consumers' connections drop and publishes go unconfirmed
    #: for `broker_restart_seconds`; each consumer reconnects up to `broker_reconnect_seconds` later.
    broker_restart: float = 0.0
    #: A consumer's unit of work loses its connection during COMMIT: the client sees an
    #: error while the commit reached the database half the time and failed the other half.
    commit_unknown: float = 0.0
    #: The clock jumps forward, by up to `clock_jump_seconds`, while a delivery is in flight.
    clock_jump: float = 0.0
    #: A fault of a `BURSTING` kind that strikes starts a burst of its kind: for
    #: `burst_seconds` it strikes at `BURST_RATE` (consumer crashes in a row, a restart storm, ...).
    burst: float = 0.0
    max_delay_seconds: float = 5.0
    #: How long a silent participant waits before it answers (past the 30 s deadline).
    silence_seconds: float = 45.0
    #: How long a gateway outage lasts.
    gateway_outage_seconds: float = 10.0
    #: How long a restarting broker is away (no deliveries, no confirms).
    broker_restart_seconds: float = 5.0
    #: The longest a consumer waits after the broker is back before it reconnects.
    broker_reconnect_seconds: float = 2.0
    #: The longest forward jump of the clock: past a step deadline, so deadlines fire on work in flight.
    clock_jump_seconds: float = 60.0
    #: How long a burst of one fault kind lasts.
    burst_seconds: float = 20.0

    def with_overrides(self, overrides: dict[str, float]) -> FaultRates:
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown fault(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        for name, value in overrides.items():
            if name in RATE_NAMES and not 0.0 <= value <= 1.0:
                raise ValueError(f"fault rate {name}={value} must be between 0 and 1")
            if value < 0:
                raise ValueError(f"{name}={value} must not be negative")
        return replace(self, **overrides)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


RATE_NAMES = (
    "duplicate",
    "lost_ack",
    "reorder",
    "delay",
    "relay_crash",
    "consumer_crash",
    "transient_error",
    "permanent_error",
    "silence",
    "gateway_outage",
    "broker_restart",
    "commit_unknown",
    "clock_jump",
    "burst",
)

#: How often a fault strikes during a burst of its kind.
BURST_RATE = 0.5
#: Faults that come in bursts in the real world (a crash loop, a restart storm, a flaky
#: network); a gateway outage is a burst already, and delays or silences in a burst would
#: only be a longer delay or silence.
BURSTING = frozenset({"lost_ack", "relay_crash", "consumer_crash", "transient_error", "broker_restart", "commit_unknown"})

PROFILES: dict[str, FaultRates] = {
    "none": FaultRates(),
    "default": FaultRates(
        duplicate=0.02,
        lost_ack=0.01,
        reorder=0.05,
        delay=0.02,
        relay_crash=0.01,
        consumer_crash=0.01,
        transient_error=0.02,
        permanent_error=0.0,
        silence=0.005,
    ),
    "chaos": FaultRates(
        duplicate=0.1,
        lost_ack=0.05,
        reorder=0.2,
        delay=0.1,
        relay_crash=0.05,
        consumer_crash=0.05,
        transient_error=0.08,
        permanent_error=0.005,
        silence=0.02,
        gateway_outage=0.01,
        broker_restart=0.0005,
        commit_unknown=0.01,
        clock_jump=0.0002,
        burst=0.002,
    ),
}


#: The profile that is not one mix but one per seed (`swarm_rates`).
SWARM = "swarm"

#: The most a swarm seed draws for each rate: high enough that every fault does its
#: worst now and then, low enough that a sound saga still ends (a bounded hostile world).
SWARM_CEILINGS: dict[str, float] = {
    "duplicate": 0.3,
    "lost_ack": 0.15,
    "reorder": 0.4,
    "delay": 0.2,
    "relay_crash": 0.1,
    "consumer_crash": 0.1,
    "transient_error": 0.15,
    "permanent_error": 0.02,
    "silence": 0.05,
    "gateway_outage": 0.03,
    "broker_restart": 0.01,
    "commit_unknown": 0.05,
    "clock_jump": 0.02,
    "burst": 0.02,
}
#: How long a swarm seed's gateway outages last, in virtual seconds: from a blip the
#: retries ride out to a burst longer than every compensation attempt together.
SWARM_OUTAGE_SECONDS = (5.0, 240.0)
#: How long a swarm seed may hold a message in transit: up to past a step deadline, so a
#: reply can arrive after its step gave up.
SWARM_DELAY_SECONDS = (1.0, 60.0)
#: The faults a swarm seed draws after the first ones, in their own pass so that adding
#: them left every earlier seed's draw of the first ones as it was.
LATER_RATE_NAMES = ("broker_restart", "commit_unknown", "clock_jump", "burst")
#: How long a swarm seed's broker restarts keep the broker away, and its longest clock jump.
SWARM_RESTART_SECONDS = (1.0, 30.0)
SWARM_JUMP_SECONDS = (5.0, 120.0)


def swarm_rates(seed: int) -> FaultRates:
    """One swarm seed's fault mix: each fault on or off, and its rate, drawn from the seed.

    A fault is on with probability 1/2, at 10-100 % of its ceiling; rates are rounded
    to four places so the command that reproduces the seed names them exactly. The
    draw uses its own generator, so the run's rng (workload, faults, deliveries) starts
    as in any other run of that seed.
    """
    rng = random.Random(f"compensa-swarm-{seed}")
    drawn: dict[str, float] = {}

    def draw(names: tuple[str, ...]) -> None:
        for name in names:
            on = rng.random() < 0.5
            rate = round(SWARM_CEILINGS[name] * rng.uniform(0.1, 1.0), 4)
            if on:
                drawn[name] = rate

    draw(tuple(name for name in RATE_NAMES if name not in LATER_RATE_NAMES))
    outage = round(rng.uniform(*SWARM_OUTAGE_SECONDS), 1)
    if "gateway_outage" in drawn:
        drawn["gateway_outage_seconds"] = outage
    delay = round(rng.uniform(*SWARM_DELAY_SECONDS), 1)
    if "delay" in drawn:
        drawn["max_delay_seconds"] = delay
    # Drawn after the older faults: a seed draws those as it did before these existed.
    draw(LATER_RATE_NAMES)
    restart = round(rng.uniform(*SWARM_RESTART_SECONDS), 1)
    if "broker_restart" in drawn:
        drawn["broker_restart_seconds"] = restart
    jump = round(rng.uniform(*SWARM_JUMP_SECONDS), 1)
    if "clock_jump" in drawn:
        drawn["clock_jump_seconds"] = jump
    return FaultRates().with_overrides(drawn)


def differences(rates: FaultRates, base: FaultRates | None = None) -> dict[str, float]:
    """The fields of `rates` that differ from `base` (no faults): what `--fault` must name to rebuild it."""
    base = base or FaultRates()
    return {f.name: getattr(rates, f.name) for f in fields(rates) if getattr(rates, f.name) != getattr(base, f.name)}


def profile(name: str, overrides: dict[str, float] | None = None, *, seed: int | None = None) -> FaultRates:
    """The named profile's rates with `overrides`; `swarm` draws them from `seed`."""
    if name == SWARM:
        if seed is None:
            raise ValueError("the swarm profile draws its rates from a seed; give one")
        return swarm_rates(seed).with_overrides(overrides or {})
    try:
        rates = PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown fault profile {name!r}; choose one of {', '.join([*PROFILES, SWARM])}") from None
    return rates.with_overrides(overrides or {})
