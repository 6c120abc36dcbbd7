"""The trip app's simulation pieces: a seeded workload, the invariants of its final state, and
coverage goals. Pure functions: the simulator does the I/O (seeding rows, reading them back).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from examples.trip.contracts import TripRequested
from examples.trip.participants import CAR, FLIGHT, HOTEL, Resource
from sagas.app import FinalState, Goal, Plan, PlannedSaga, SimulationPieces
from sagas.simulation.invariants import Violation

RESOURCES: tuple[Resource, ...] = (FLIGHT, CAR, HOTEL)
#: Resources of each kind, and the units each has as a share of the trips that may ask for
#: it: hotels are the scarcest, so late trips find them full and unwind their flight and car.
PER_KIND = 3
COVER = {"flights": 0.95, "cars": 0.9, "hotels": 0.7}
PREFIX = {"flights": "FL", "cars": "CAR", "hotels": "HTL"}
#: Mean virtual seconds between two trip requests.
MEAN_INTERARRIVAL_SECONDS = 0.5


def resource_ids(resource: Resource) -> list[str]:
    return [f"{PREFIX[resource.participant]}-{n}" for n in range(1, PER_KIND + 1)]


def workload(sagas: int, rng: random.Random) -> Plan:
    """Draw every trip and every inventory level up front from `rng`, so a seed replays the run."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for resource in RESOURCES:
        capacity = max(1, math.ceil(sagas / PER_KIND * COVER[resource.participant]))
        rows[resource.tables.inventory.name] = [
            {"resource_id": rid, "capacity": capacity, "booked": 0} for rid in resource_ids(resource)
        ]
    trips = []
    at = 0.0
    width = len(str(sagas))
    for n in range(sagas):
        at += rng.expovariate(1.0 / MEAN_INTERARRIVAL_SECONDS)
        trip_id = f"trip-{n:0{width}d}"
        request = TripRequested(
            trip_id=trip_id,
            traveller=f"traveller-{rng.randrange(1000)}",
            flight=rng.choice(resource_ids(FLIGHT)),
            car_location=rng.choice(resource_ids(CAR)),
            hotel=rng.choice(resource_ids(HOTEL)),
            nights=rng.randint(1, 7),
        )
        trips.append(PlannedSaga(trip_id, round(at, 6), request))
    return Plan(sagas=tuple(trips), rows=rows)


def invariants(state: FinalState) -> list[Violation]:
    """No booking held for a trip that did not go ahead; a confirmed trip holds all three; units conserved."""
    found: list[Violation] = []
    held_by_trip: dict[str, set[str]] = {}
    for resource in RESOURCES:
        kind = resource.participant
        bookings = state.rows(resource.tables.bookings)
        held = [b for b in bookings if b["status"] == "booked"]
        for booking in held:
            trip = str(booking["trip_id"])
            held_by_trip.setdefault(trip, set()).add(kind)
            status = state.saga_status.get(trip)
            if status != "completed":
                found.append(
                    Violation(
                        "no booking left for a trip that did not go ahead",
                        f"{kind}: {booking['resource_id']} still booked, trip {status}",
                        trip,
                    )
                )
        found += _conserved(
            kind, state.plan.rows.get(resource.tables.inventory.name, ()), state.rows(resource.tables.inventory), held
        )
    for trip, status in sorted(state.saga_status.items()):
        missing = sorted({r.participant for r in RESOURCES} - held_by_trip.get(trip, set()))
        if status == "completed" and missing:
            found.append(Violation("a confirmed trip holds all three bookings", f"no {', '.join(missing)} booking", trip))
    return found


def _conserved(
    kind: str, initial: Sequence[Mapping[str, Any]], final: Sequence[Mapping[str, Any]], held: Sequence[Mapping[str, Any]]
) -> list[Violation]:
    """Each resource keeps its capacity, and counts as booked exactly the bookings that hold it."""
    found = []
    capacity = {row["resource_id"]: row["capacity"] for row in initial}
    holding = Counter(b["resource_id"] for b in held)
    for row in final:
        rid = row["resource_id"]
        if row["capacity"] != capacity.get(rid):
            found.append(Violation("inventory conserved", f"{kind} {rid}: capacity {row['capacity']} != {capacity.get(rid)}"))
        if row["booked"] != holding[rid]:
            found.append(
                Violation("inventory conserved", f"{kind} {rid}: {row['booked']} units booked, {holding[rid]} bookings hold one")
            )
    return found


def _unwound(state: FinalState) -> int:
    """Cancelled trips whose flight and car were both booked, then cancelled (a late failure undid two steps)."""
    cancelled = {trip for trip, status in state.saga_status.items() if status == "cancelled"}
    undone: Counter[str] = Counter()
    for resource in (FLIGHT, CAR):
        for booking in state.rows(resource.tables.bookings):
            if booking["trip_id"] in cancelled and booking["status"] == "cancelled" and booking["resource_id"] is not None:
                undone[str(booking["trip_id"])] += 1
    return sum(1 for count in undone.values() if count == 2)


def _voided(state: FinalState) -> int:
    """Cancellations that arrived before their booking: the void that makes the late booking fail."""
    return sum(1 for r in RESOURCES for b in state.rows(r.tables.bookings) if b["resource_id"] is None)


PIECES = SimulationPieces(
    workload=workload,
    invariants=invariants,
    goals={
        "trip_unwound": Goal("a trip was cancelled after its flight and car were booked, and both were undone", _unwound),
        "booking_voided": Goal("a cancellation arrived before its booking and voided it", _voided),
    },
)
