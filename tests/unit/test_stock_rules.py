"""Stock rules without I/O: all-or-nothing reserve, transitions, conservation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumers.stock import rules
from consumers.stock.rules import Level, Movement, Reservation, ReservationStatus
from contracts import BusinessRuleError, StockLine
from contracts.messages import StockCommitFailed, StockCommitted, StockReleased, StockReservationFailed, StockReserved

NOW = datetime(2026, 1, 1, tzinfo=UTC)
SKUS = ("apple", "pear", "plum")


def lines(**quantities: int) -> tuple[StockLine, ...]:
    return tuple(StockLine(sku=sku, quantity=q) for sku, q in quantities.items())


def held(status: ReservationStatus, reason: str | None = None) -> Reservation:
    return Reservation("o1", status, lines(apple=2), NOW + timedelta(minutes=15), reason)


# ------------------------------------------------------------------ reserve


def test_reserve_holds_every_line_until_the_ttl() -> None:
    levels = {"apple": Level(5, 0), "pear": Level(1, 3)}
    decision = rules.decide_reserve(None, levels, "o1", lines(apple=2, pear=1), now=NOW, ttl=timedelta(minutes=5))

    assert decision.event == StockReserved(order_id="o1", lines=lines(apple=2, pear=1))
    assert decision.reservation == Reservation(
        "o1", ReservationStatus.RESERVED, lines(apple=2, pear=1), NOW + timedelta(minutes=5)
    )
    assert rules.apply(levels, decision.movements) == {"apple": Level(3, 2), "pear": Level(0, 4)}


def test_reserve_names_the_sku_and_the_shortfall() -> None:
    levels = {"apple": Level(5, 0), "pear": Level(1, 0)}
    decision = rules.decide_reserve(None, levels, "o1", lines(apple=2, pear=3), now=NOW)

    assert decision.movements == ()
    assert isinstance(decision.event, StockReservationFailed)
    assert decision.event.reason == "insufficient stock for SKU 'pear': requested 3, available 1, short by 2"
    assert decision.reservation is not None and decision.reservation.status is ReservationStatus.FAILED


def test_reserve_of_an_unknown_sku_fails_without_moving_anything() -> None:
    decision = rules.decide_reserve(None, {"apple": Level(5, 0)}, "o1", lines(apple=1, kiwi=1), now=NOW)

    assert decision.movements == ()
    assert isinstance(decision.event, StockReservationFailed)
    assert decision.event.reason == "unknown SKU 'kiwi'"


def test_reserve_sums_repeated_skus_before_checking() -> None:
    twice = (StockLine(sku="apple", quantity=2), StockLine(sku="apple", quantity=2))
    decision = rules.decide_reserve(None, {"apple": Level(3, 0)}, "o1", twice, now=NOW)

    assert isinstance(decision.event, StockReservationFailed)
    assert "requested 4, available 3" in decision.event.reason


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (ReservationStatus.RESERVED, StockReserved(order_id="o1", lines=lines(apple=2))),
        (ReservationStatus.COMMITTED, StockReserved(order_id="o1", lines=lines(apple=2))),
        (ReservationStatus.RELEASED, StockReservationFailed(order_id="o1", reason="reservation already released")),
        (ReservationStatus.FAILED, StockReservationFailed(order_id="o1", reason="short")),
    ],
)
def test_a_repeated_reserve_gets_the_first_answer_and_changes_nothing(status: ReservationStatus, expected: object) -> None:
    existing = held(status, reason="short" if status is ReservationStatus.FAILED else None)
    decision = rules.decide_reserve(existing, {"apple": Level(100, 0)}, "o1", lines(apple=2), now=NOW)

    assert (decision.reservation, decision.movements, decision.event) == (None, (), expected)


def test_reserve_after_a_void_fails() -> None:
    decision = rules.decide_reserve(
        Reservation("o1", ReservationStatus.VOIDED), {"apple": Level(9, 0)}, "o1", lines(apple=1), now=NOW
    )

    assert decision.event == StockReservationFailed(order_id="o1", reason="order voided")
    assert decision.movements == ()


def test_a_reserve_with_other_lines_for_the_same_order_is_refused() -> None:
    with pytest.raises(BusinessRuleError, match="conflicts"):
        rules.decide_reserve(held(ReservationStatus.RESERVED), {}, "o1", lines(apple=3), now=NOW)


@settings(max_examples=200, deadline=None)
@given(
    on_hand=st.lists(st.integers(0, 6), min_size=len(SKUS), max_size=len(SKUS)),
    wanted=st.lists(st.tuples(st.sampled_from((*SKUS, "kiwi")), st.integers(1, 6)), min_size=1, max_size=5),
)
def test_reserve_is_all_or_nothing_and_never_negative(on_hand: list[int], wanted: list[tuple[str, int]]) -> None:
    levels = {sku: Level(n, 1) for sku, n in zip(SKUS, on_hand, strict=True)}
    order_lines = tuple(StockLine(sku=sku, quantity=q) for sku, q in wanted)
    decision = rules.decide_reserve(None, levels, "o1", order_lines, now=NOW)

    totals = rules.quantities(order_lines)
    fits = all(sku in levels and levels[sku].on_hand >= q for sku, q in totals.items())
    if not fits:
        assert decision.movements == ()
        assert isinstance(decision.event, StockReservationFailed)
        return
    after = rules.apply(levels, decision.movements)
    assert isinstance(decision.event, StockReserved)
    for sku, level in after.items():
        assert level.on_hand >= 0 and level.reserved >= 0
        assert level.on_hand == levels[sku].on_hand - totals.get(sku, 0)
        assert level.on_hand + level.reserved == levels[sku].on_hand + levels[sku].reserved


# ------------------------------------------------------------------ commit


def test_commit_turns_held_stock_into_a_sale() -> None:
    decision = rules.decide_commit(held(ReservationStatus.RESERVED), "o1", now=NOW)

    assert decision.event == StockCommitted(order_id="o1")
    assert decision.reservation is not None and decision.reservation.status is ReservationStatus.COMMITTED
    assert decision.movements == (Movement("apple", 0, -2),)


def test_a_repeated_commit_answers_committed_and_moves_nothing() -> None:
    decision = rules.decide_commit(held(ReservationStatus.COMMITTED), "o1", now=NOW)

    assert (decision.reservation, decision.movements, decision.event) == (None, (), StockCommitted(order_id="o1"))


@pytest.mark.parametrize(
    ("existing", "reason"),
    [
        (None, "no reservation for this order"),
        (held(ReservationStatus.RELEASED), "reservation already released"),
        (Reservation("o1", ReservationStatus.VOIDED), "order voided"),
        (held(ReservationStatus.FAILED, reason="short"), "reservation failed: short"),
    ],
)
def test_commit_fails_without_a_live_reservation(existing: Reservation | None, reason: str) -> None:
    decision = rules.decide_commit(existing, "o1", now=NOW)

    assert (decision.reservation, decision.movements) == (None, ())
    assert decision.event == StockCommitFailed(order_id="o1", reason=reason)


def test_commit_of_an_expired_reservation_fails() -> None:
    decision = rules.decide_commit(held(ReservationStatus.RESERVED), "o1", now=NOW + timedelta(minutes=15))

    assert isinstance(decision.event, StockCommitFailed)
    assert decision.event.reason.startswith("reservation expired at")
    assert decision.movements == ()


# ------------------------------------------------------------------ release and expiry


def test_release_of_a_held_reservation_returns_the_stock() -> None:
    decision = rules.decide_release(held(ReservationStatus.RESERVED), "o1")

    assert decision.event == StockReleased(order_id="o1", lines=lines(apple=2))
    assert decision.movements == (Movement("apple", 2, -2),)
    assert decision.reservation is not None and decision.reservation.status is ReservationStatus.RELEASED


def test_release_of_a_committed_reservation_puts_the_sale_back_on_hand() -> None:
    decision = rules.decide_release(held(ReservationStatus.COMMITTED), "o1")

    assert decision.event == StockReleased(order_id="o1", lines=lines(apple=2))
    assert decision.movements == (Movement("apple", 2, 0),)


def test_release_of_an_unknown_order_leaves_a_void_tombstone() -> None:
    decision = rules.decide_release(None, "o1")

    assert decision.reservation == Reservation("o1", ReservationStatus.VOIDED)
    assert decision.movements == ()
    assert decision.event == StockReleased(order_id="o1")


@pytest.mark.parametrize(
    "existing",
    [
        held(ReservationStatus.RELEASED),
        Reservation("o1", ReservationStatus.VOIDED),
        held(ReservationStatus.FAILED, reason="short"),
    ],
)
def test_a_repeated_release_answers_released_with_no_lines(existing: Reservation) -> None:
    decision = rules.decide_release(existing, "o1")

    assert (decision.reservation, decision.movements, decision.event) == (None, (), StockReleased(order_id="o1"))


def test_expiry_releases_only_held_reservations_that_are_due() -> None:
    due = NOW + timedelta(minutes=15)
    assert rules.decide_expiry(held(ReservationStatus.RESERVED), now=due - timedelta(seconds=1)) is None
    assert rules.decide_expiry(held(ReservationStatus.COMMITTED), now=due) is None
    decision = rules.decide_expiry(held(ReservationStatus.RESERVED), now=due)
    assert decision is not None and decision.movements == (Movement("apple", 2, -2),)


def test_apply_refuses_a_movement_that_would_go_negative() -> None:
    with pytest.raises(ValueError, match="negative"):
        rules.apply({"apple": Level(1, 0)}, [Movement("apple", -2, 2)])


# ------------------------------------------------------------------ conservation

commands = st.lists(
    st.tuples(
        st.sampled_from(["reserve", "commit", "release", "expire"]),
        st.sampled_from(["o1", "o2", "o3", "o4"]),
        st.lists(st.tuples(st.sampled_from(SKUS), st.integers(1, 4)), min_size=1, max_size=3),
    ),
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(initial=st.lists(st.integers(0, 8), min_size=3, max_size=3), steps=commands)
def test_any_sequence_of_decisions_conserves_stock(initial: list[int], steps: list) -> None:  # type: ignore[type-arg]
    start = dict(zip(SKUS, initial, strict=True))
    levels = {sku: Level(n, 0) for sku, n in start.items()}
    reservations: dict[str, Reservation] = {}
    now = NOW
    for name, order_id, wanted in steps:
        now += timedelta(minutes=4)
        existing = reservations.get(order_id)
        if name == "reserve":
            order_lines = (
                existing.lines if existing and existing.lines else tuple(StockLine(sku=s, quantity=q) for s, q in wanted)
            )
            decision = rules.decide_reserve(existing, levels, order_id, order_lines, now=now)
        elif name == "commit":
            decision = rules.decide_commit(existing, order_id, now=now)
        elif name == "release":
            decision = rules.decide_release(existing, order_id)
        else:
            expired = rules.decide_expiry(existing, now=now) if existing else None
            if expired is None:
                continue
            decision = expired
        levels = rules.apply(levels, decision.movements)
        if decision.reservation is not None:
            reservations[order_id] = decision.reservation

    sold: dict[str, int] = {}
    for reservation in reservations.values():
        if reservation.status is ReservationStatus.COMMITTED:
            for sku, q in rules.quantities(reservation.lines).items():
                sold[sku] = sold.get(sku, 0) + q
    for sku, level in levels.items():
        assert level.on_hand >= 0 and level.reserved >= 0
        assert start[sku] == level.on_hand + level.reserved + sold.get(sku, 0)
