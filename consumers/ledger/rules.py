"""Ledger rules: double-entry postings for captures and refunds, always balanced. No I/O."""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

from contracts import Money, Posting


class Kind(StrEnum):
    CAPTURE = "capture"
    REFUND = "refund"


def cash_account(currency: str) -> str:
    return f"cash:{currency}"


def sales_account(currency: str) -> str:
    return f"sales:{currency}"


def transaction_id(kind: Kind, order_id: str) -> str:
    """Name the posting after what it records, so the same fact is never posted twice."""
    return f"{kind.value}:{order_id}"


def postings_for(kind: Kind, amount: Money) -> tuple[Posting, ...]:
    """Return the balanced postings for a capture or refund; none for a zero amount."""
    if amount.amount == 0:
        return ()
    cash, sales = cash_account(amount.currency), sales_account(amount.currency)
    debit, credit = (cash, sales) if kind is Kind.CAPTURE else (sales, cash)
    postings = (
        Posting(account=debit, debit=amount.amount, credit=0),
        Posting(account=credit, debit=0, credit=amount.amount),
    )
    assert is_balanced(postings), postings
    return postings


def is_balanced(postings: Iterable[Posting]) -> bool:
    postings = tuple(postings)
    return sum(p.debit for p in postings) == sum(p.credit for p in postings)


def balance_changes(postings: Iterable[Posting]) -> dict[str, int]:
    """Return debits minus credits per account, in account order."""
    changes: dict[str, int] = {}
    for posting in postings:
        changes[posting.account] = changes.get(posting.account, 0) + posting.debit - posting.credit
    return dict(sorted(changes.items()))
