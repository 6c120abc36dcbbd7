"""Ledger: double-entry postings for captures and refunds; debits always equal credits."""

from consumers.ledger.handlers import HANDLERS, handle_payment_authorized, handle_payment_refunded, lock_batch
from consumers.ledger.rules import Kind, postings_for
from consumers.ledger.store import cash_by_order, trial_balance
from consumers.ledger.tables import SERVICE, ledger_balances, ledger_entries, ledger_transactions

__all__ = [
    "HANDLERS",
    "SERVICE",
    "Kind",
    "cash_by_order",
    "handle_payment_authorized",
    "handle_payment_refunded",
    "ledger_balances",
    "ledger_entries",
    "ledger_transactions",
    "lock_batch",
    "postings_for",
    "trial_balance",
]
