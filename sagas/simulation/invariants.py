"""The invariants every run must keep, checked over a plain snapshot of the final state."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

TERMINAL_STATUSES = frozenset({"completed", "cancelled", "rejected", "compensation_failed"})


@dataclass(frozen=True)
class Violation:
    invariant: str
    detail: str
    saga_id: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {"invariant": self.invariant, "saga_id": self.saga_id, "detail": self.detail}


@dataclass
class Snapshot:
    """What the checker needs to know about the end of a run; built by the runtime."""

    #: order id -> total in minor units, for every order the workload placed.
    placed: dict[str, int]
    saga_status: dict[str, str]
    order_status: dict[str, str]
    initial_stock: dict[str, int]
    #: sku -> (on hand, reserved)
    stock: dict[str, tuple[int, int]]
    #: sku -> units in committed reservations (sold)
    committed_units: dict[str, int]
    #: order id -> units per sku that are committed (sold) for that order
    committed_by_order: dict[str, int]
    #: order id -> (captured, refunded) at the payment service
    payments: dict[str, tuple[int, int]]
    ledger_debits: int
    ledger_credits: int
    #: order id -> (captured, refunded) according to the ledger's postings
    ledger_by_order: dict[str, tuple[int, int]]
    #: (order id, kind) pairs posted more than once
    ledger_duplicates: list[tuple[str, str]]
    outbox_pending: dict[str, int]
    published_ids: set[str]
    consumed_ids: set[str]
    dead_lettered: dict[str, str]
    unrouted_ids: set[str]
    messages_left_in_queues: int
    extra: dict[str, object] = field(default_factory=dict)
    #: message ids of outbox rows marked sent; None when the runtime cannot tell.
    marked_sent_ids: set[str] | None = None


def check(s: Snapshot) -> list[Violation]:
    """Return every violated invariant; an empty list means the run is sound."""
    found: list[Violation] = []
    found += _every_saga_terminal(s)
    found += _stock_conserved(s)
    found += _money_matches_outcome(s)
    found += _ledger_balanced(s)
    found += _outbox_drained(s)
    found += _messages_accounted_for(s)
    found += _order_status_matches(s)
    return found


def check_common(s: Snapshot) -> list[Violation]:
    """The invariants of any saga application (`--app`): every saga terminal, every outbox
    row published, every published message consumed or dead-lettered. The order app's
    own (stock, money, ledger, order status) are the rest of `check`."""
    return _every_saga_terminal(s) + _outbox_drained(s) + _messages_accounted_for(s)


def _every_saga_terminal(s: Snapshot) -> list[Violation]:
    found = []
    for order_id in s.placed:
        status = s.saga_status.get(order_id)
        if status is None:
            found.append(Violation("every saga terminal", "no saga was started for this order", order_id))
        elif status not in TERMINAL_STATUSES:
            found.append(Violation("every saga terminal", f"saga ended the run {status}", order_id))
        elif status == "compensation_failed":
            found.append(Violation("every saga terminal", "compensation failed (needs an operator)", order_id))
    return found


def _stock_conserved(s: Snapshot) -> list[Violation]:
    found = []
    for sku, initial in s.initial_stock.items():
        on_hand, reserved = s.stock.get(sku, (0, 0))
        sold = s.committed_units.get(sku, 0)
        if on_hand < 0 or reserved < 0:
            found.append(Violation("stock never negative", f"{sku}: on hand {on_hand}, reserved {reserved}"))
        if on_hand + reserved + sold != initial:
            found.append(
                Violation(
                    "stock conserved",
                    f"{sku}: on hand {on_hand} + reserved {reserved} + sold {sold} != initial {initial}",
                )
            )
        if reserved != 0:
            found.append(Violation("no stock left reserved", f"{sku}: {reserved} units still reserved at the end"))
    for order_id, units in s.committed_by_order.items():
        if units and s.saga_status.get(order_id) != "completed":
            found.append(Violation("stock sold only for completed orders", f"{units} units committed", order_id))
    return found


def _money_matches_outcome(s: Snapshot) -> list[Violation]:
    found = []
    for order_id, total in s.placed.items():
        captured, refunded = s.payments.get(order_id, (0, 0))
        expected = total if s.saga_status.get(order_id) == "completed" else 0
        if refunded > captured:
            found.append(Violation("refund never exceeds charge", f"refunded {refunded} > captured {captured}", order_id))
        if captured - refunded != expected:
            found.append(
                Violation(
                    "captured - refunded = total if completed else 0",
                    f"captured {captured} - refunded {refunded} != {expected} (saga {s.saga_status.get(order_id)})",
                    order_id,
                )
            )
    return found


def _ledger_balanced(s: Snapshot) -> list[Violation]:
    found = []
    if s.ledger_debits != s.ledger_credits:
        found.append(Violation("ledger balanced", f"debits {s.ledger_debits} != credits {s.ledger_credits}"))
    for order_id in sorted(set(s.payments) | set(s.ledger_by_order)):
        if s.payments.get(order_id, (0, 0)) != s.ledger_by_order.get(order_id, (0, 0)):
            found.append(
                Violation(
                    "ledger matches payments",
                    f"payments (captured, refunded) {s.payments.get(order_id, (0, 0))} "
                    f"!= ledger {s.ledger_by_order.get(order_id, (0, 0))}",
                    order_id,
                )
            )
    for order_id, kind in s.ledger_duplicates:
        found.append(Violation("no effect applied twice", f"ledger {kind} posted more than once", order_id))
    return found


def _outbox_drained(s: Snapshot) -> list[Violation]:
    found = [
        Violation("every outbox row published", f"{service}: {count} rows still pending")
        for service, count in sorted(s.outbox_pending.items())
        if count
    ]
    if s.marked_sent_ids is not None:
        # A row marked sent that the broker never confirmed is a message lost by the relay.
        for message_id in sorted(s.marked_sent_ids - s.published_ids)[:20]:
            found.append(Violation("every outbox row published", f"message {message_id} marked sent, never published"))
    return found


def _messages_accounted_for(s: Snapshot) -> list[Violation]:
    found = []
    lost = s.published_ids - s.consumed_ids - set(s.dead_lettered) - s.unrouted_ids
    for message_id in sorted(lost)[:20]:
        found.append(Violation("every published message consumed or dead-lettered", f"message {message_id} vanished"))
    for message_id, reason in sorted(s.dead_lettered.items()):
        if not reason:
            found.append(Violation("dead letters carry a reason", f"message {message_id} has no reason"))
    if s.messages_left_in_queues:
        found.append(
            Violation(
                "every published message consumed or dead-lettered", f"{s.messages_left_in_queues} messages left in work queues"
            )
        )
    return found


def _order_status_matches(s: Snapshot) -> list[Violation]:
    found = []
    for order_id in s.placed:
        saga = s.saga_status.get(order_id)
        order = s.order_status.get(order_id)
        if saga in {"completed", "cancelled", "rejected"} and order != saga:
            found.append(Violation("order status matches saga outcome", f"order {order} but saga {saga}", order_id))
    return found


def summarize(violations: list[Violation]) -> Mapping[str, int]:
    counts: dict[str, int] = {}
    for violation in violations:
        counts[violation.invariant] = counts.get(violation.invariant, 0) + 1
    return counts
