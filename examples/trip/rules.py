"""What a booking participant decides, as pure functions: state and a command in, a decision out.

Flights, cars and hotels follow the same rules over their own inventory: book a unit if
one is free, once per trip; cancel what a trip booked, once; and a cancellation that
arrives before its booking (reordered, or sent after the step timed out) leaves a void,
so the late booking fails instead of holding a unit nobody will release.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class BookingStatus(StrEnum):
    BOOKED = "booked"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Booking:
    trip_id: str
    resource_id: str | None
    status: BookingStatus


@dataclass(frozen=True)
class Decision:
    """The booking row to store (None: unchanged), the units to take (+1) or give back (-1), and the reply."""

    booking: Booking | None
    units: int
    #: "booked", "failed" or "cancelled": which reply the handler sends.
    reply: str
    reason: str = ""


def decide_book(existing: Booking | None, trip_id: str, resource_id: str, *, free: int | None) -> Decision:
    """Book one unit of `resource_id` for the trip, or say why not; a repeat answers as the first time did."""
    if existing is not None:
        if existing.status is BookingStatus.BOOKED:
            return Decision(None, 0, "booked")
        reason = "cancelled before it was booked" if existing.status is BookingStatus.CANCELLED else "failed before"
        return Decision(None, 0, "failed", reason)
    if free is None:
        return Decision(Booking(trip_id, resource_id, BookingStatus.FAILED), 0, "failed", f"unknown {resource_id}")
    if free <= 0:
        return Decision(Booking(trip_id, resource_id, BookingStatus.FAILED), 0, "failed", f"{resource_id} is sold out")
    return Decision(Booking(trip_id, resource_id, BookingStatus.BOOKED), 1, "booked")


def decide_cancel(existing: Booking | None, trip_id: str) -> Decision:
    """Cancel the trip's booking and give its unit back; void the trip if nothing was booked yet."""
    if existing is None:
        return Decision(Booking(trip_id, None, BookingStatus.CANCELLED), 0, "cancelled")
    if existing.status is BookingStatus.BOOKED:
        return Decision(Booking(trip_id, existing.resource_id, BookingStatus.CANCELLED), -1, "cancelled")
    return Decision(None, 0, "cancelled")
