"""Ledger handlers: post each capture and refund once, then announce the new balances."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog

from consumers.ledger import rules
from consumers.ledger.rules import Kind
from consumers.ledger.store import LedgerStore
from contracts import Message, Money
from contracts.messages import LedgerUpdated, PaymentAuthorized, PaymentRefunded
from outbox.uow import Handler, UnitOfWork

log = structlog.get_logger("compensa.ledger")


async def handle_payment_authorized(uow: UnitOfWork, message: Message[PaymentAuthorized]) -> None:
    """Post the captured amount: debit cash, credit sales."""
    await _post(uow, Kind.CAPTURE, message.payload.order_id, message.payload.amount)


async def handle_payment_refunded(uow: UnitOfWork, message: Message[PaymentRefunded]) -> None:
    """Post the refunded amount, if any: debit sales, credit cash."""
    await _post(uow, Kind.REFUND, message.payload.order_id, message.payload.amount)


async def _post(uow: UnitOfWork, kind: Kind, order_id: str, amount: Money) -> None:
    postings = rules.postings_for(kind, amount)
    if not postings:
        return
    transaction_id = rules.transaction_id(kind, order_id)
    store = LedgerStore(uow.connection)
    if not await store.open_transaction(transaction_id, order_id, kind, uow.now()):
        log.info("ledger.already_posted", transaction_id=transaction_id)
        return
    await store.add_entries(transaction_id, postings)
    balances = await store.apply_balances(rules.balance_changes(postings))
    uow.send(LedgerUpdated(order_id=order_id, transaction_id=transaction_id, postings=postings, balances=balances))


_KINDS = {PaymentAuthorized.message_type: Kind.CAPTURE, PaymentRefunded.message_type: Kind.REFUND}


async def lock_batch(uow: UnitOfWork, messages: Sequence[Message[Any]]) -> None:
    """Lock every balance row a batch will post to, in account order, before any posting.

    Each posting changes its accounts in account order, but a batch mixing currencies
    takes cash:X and sales:X posting after posting, so two processes' batches could
    each hold a balance the other waits for. Taken first, sorted, those row locks queue.
    """
    accounts = {
        posting.account for message in messages for posting in rules.postings_for(_KINDS[message.type], message.payload.amount)
    }
    await LedgerStore(uow.connection).lock_balances(accounts)


HANDLERS: dict[str, Handler] = {
    PaymentAuthorized.message_type: handle_payment_authorized,
    PaymentRefunded.message_type: handle_payment_refunded,
}
