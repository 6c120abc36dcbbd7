"""Stock rules: reserve every line or none, commit, release, expire. No I/O.

Each decision takes the current reservation (and stock levels where it needs them)
and returns the reservation to store, the stock movements to apply and the event
to send. ``on_hand`` counts what is free to reserve; ``reserved`` what is held for
open reservations. For every SKU:
initial on_hand == on_hand + reserved + quantities of committed reservations.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum

from contracts import BusinessRuleError, Payload, StockLine
from contracts.messages import (
    StockCommitFailed,
    StockCommitted,
    StockReleased,
    StockReservationFailed,
    StockReserved,
    clip_text,
)

RESERVATION_TTL = timedelta(minutes=15)


class ReservationStatus(StrEnum):
    RESERVED = "reserved"
    COMMITTED = "committed"
    RELEASED = "released"
    #: Release arrived before any reserve: a tombstone that refuses a late reserve.
    VOIDED = "voided"
    #: Reserve was refused; kept so a repeated reserve gets the same answer.
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Level:
    on_hand: int
    reserved: int


@dataclass(frozen=True, slots=True)
class Movement:
    """A change to one SKU's counters (deltas, not new values)."""

    sku: str
    on_hand: int
    reserved: int


@dataclass(frozen=True, slots=True)
class Reservation:
    order_id: str
    status: ReservationStatus
    lines: tuple[StockLine, ...] = ()
    expires_at: datetime | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """What to store (None: nothing changes), what to move and what to say."""

    reservation: Reservation | None
    movements: tuple[Movement, ...]
    event: Payload


def quantities(lines: Iterable[StockLine]) -> dict[str, int]:
    """Sum quantities per SKU, in SKU order (the order rows are locked in)."""
    totals: dict[str, int] = {}
    for line in lines:
        totals[line.sku] = totals.get(line.sku, 0) + line.quantity
    return dict(sorted(totals.items()))


def apply(levels: Mapping[str, Level], movements: Iterable[Movement]) -> dict[str, Level]:
    """Return the levels after the movements; refuse any that would go negative."""
    result = dict(levels)
    for move in movements:
        level = result[move.sku]
        after = Level(level.on_hand + move.on_hand, level.reserved + move.reserved)
        if after.on_hand < 0 or after.reserved < 0:
            raise ValueError(f"movement {move} would make SKU {move.sku!r} negative: {after}")
        result[move.sku] = after
    return result


def shortfalls(levels: Mapping[str, Level], lines: Iterable[StockLine]) -> list[str]:
    """Name every SKU the lines cannot get, and by how much."""
    problems = []
    for sku, wanted in quantities(lines).items():
        level = levels.get(sku)
        if level is None:
            problems.append(f"unknown SKU {sku!r}")
        elif level.on_hand < wanted:
            problems.append(
                f"insufficient stock for SKU {sku!r}: requested {wanted}, "
                f"available {level.on_hand}, short by {wanted - level.on_hand}"
            )
    return problems


def decide_reserve(
    existing: Reservation | None,
    levels: Mapping[str, Level],
    order_id: str,
    lines: tuple[StockLine, ...],
    *,
    now: datetime,
    ttl: timedelta = RESERVATION_TTL,
) -> Decision:
    """Reserve all lines or none; answer a repeated reserve from the stored outcome."""
    if existing is not None:
        return _repeat_reserve(existing, lines)
    problems = shortfalls(levels, lines)
    if problems:
        reason = clip_text("; ".join(problems))  # one part per short line: many lines, a long reason
        return Decision(
            Reservation(order_id, ReservationStatus.FAILED, lines, reason=reason),
            (),
            StockReservationFailed(order_id=order_id, reason=reason),
        )
    movements = tuple(Movement(sku, -q, q) for sku, q in quantities(lines).items())
    return Decision(
        Reservation(order_id, ReservationStatus.RESERVED, lines, expires_at=now + ttl),
        movements,
        StockReserved(order_id=order_id, lines=lines),
    )


def _repeat_reserve(existing: Reservation, lines: tuple[StockLine, ...]) -> Decision:
    order_id = existing.order_id
    if existing.status is ReservationStatus.VOIDED:
        return _unchanged(StockReservationFailed(order_id=order_id, reason="order voided"))
    if quantities(existing.lines) != quantities(lines):
        raise BusinessRuleError(
            f"stock.reserve for order {order_id} conflicts with its earlier reserve: "
            f"{quantities(lines)} != {quantities(existing.lines)}"
        )
    if existing.status in (ReservationStatus.RESERVED, ReservationStatus.COMMITTED):
        return _unchanged(StockReserved(order_id=order_id, lines=existing.lines))
    if existing.status is ReservationStatus.RELEASED:
        reason = "reservation already released"
    else:
        reason = existing.reason or "reservation failed"
    return _unchanged(StockReservationFailed(order_id=order_id, reason=reason))


def decide_commit(existing: Reservation | None, order_id: str, *, now: datetime) -> Decision:
    """Turn a live reservation into a sale; repeat the answer for one already committed."""
    if existing is None:
        return _commit_failed(order_id, "no reservation for this order")
    status = existing.status
    if status is ReservationStatus.COMMITTED:
        return _unchanged(StockCommitted(order_id=order_id))
    if status is ReservationStatus.RESERVED:
        if existing.expires_at is not None and existing.expires_at <= now:
            return _commit_failed(order_id, f"reservation expired at {existing.expires_at.isoformat()}")
        movements = tuple(Movement(sku, 0, -q) for sku, q in quantities(existing.lines).items())
        return Decision(replace(existing, status=ReservationStatus.COMMITTED), movements, StockCommitted(order_id=order_id))
    reasons = {
        ReservationStatus.RELEASED: "reservation already released",
        ReservationStatus.VOIDED: "order voided",
        ReservationStatus.FAILED: f"reservation failed: {existing.reason}",
    }
    return _commit_failed(order_id, reasons[status])


def decide_release(existing: Reservation | None, order_id: str) -> Decision:
    """Give held or committed stock back; void an order whose reserve has not arrived."""
    if existing is None:
        return Decision(Reservation(order_id, ReservationStatus.VOIDED), (), StockReleased(order_id=order_id))
    counts = quantities(existing.lines)
    if existing.status is ReservationStatus.RESERVED:
        movements = tuple(Movement(sku, q, -q) for sku, q in counts.items())
    elif existing.status is ReservationStatus.COMMITTED:
        # Un-commit: the saga compensates a commit that outlived its deadline.
        movements = tuple(Movement(sku, q, 0) for sku, q in counts.items())
    else:
        return _unchanged(StockReleased(order_id=order_id))
    return Decision(
        replace(existing, status=ReservationStatus.RELEASED),
        movements,
        StockReleased(order_id=order_id, lines=existing.lines),
    )


def decide_expiry(existing: Reservation, *, now: datetime) -> Decision | None:
    """Release a reservation still held past its expiry; None when it is not due."""
    if existing.status is not ReservationStatus.RESERVED or not is_expired(existing, now):
        return None
    return decide_release(existing, existing.order_id)


def is_expired(reservation: Reservation, now: datetime) -> bool:
    return reservation.expires_at is not None and reservation.expires_at <= now


def _unchanged(event: Payload) -> Decision:
    return Decision(None, (), event)


def _commit_failed(order_id: str, reason: str) -> Decision:
    return _unchanged(StockCommitFailed(order_id=order_id, reason=reason))
