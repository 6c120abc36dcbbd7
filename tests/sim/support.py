"""Small runs and deliberately broken variants of the product, for the checker to catch.

Every variant is built here, from test code, through the seams SimulationOptions
offers; the product code itself is never changed.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from consumers.ledger import rules as ledger_rules
from consumers.ledger.rules import Kind
from consumers.ledger.store import LedgerStore
from consumers.stock import rules as stock_rules
from consumers.stock.handlers import handle_release_stock
from consumers.stock.store import StockStore
from contracts import Message, TransientError
from contracts.messages import PaymentAuthorized, PaymentRefunded, ReleaseStock
from examples.trip.app import app as trip_app
from infra.simulation.driver import SimulationOptions, SimulationResult, run_simulation
from outbox.ports import OutgoingMessage, Publisher
from outbox.uow import UnitOfWork
from sagas.orchestrator import Orchestrator
from sagas.order_saga import ORDER_SAGA
from sagas.simulation.faults import FaultRates
from sagas.simulation.invariants import Violation
from sagas.simulation.workload import WorkloadSpec


def simulate(seed: int = 1, sagas: int = 40, faults: FaultRates | None = None, **options: Any) -> SimulationResult:
    """One small simulated run; `workload` overrides go in as WorkloadSpec fields."""
    workload = options.pop("workload", {})
    return run_simulation(
        SimulationOptions(
            seed=seed,
            workload=WorkloadSpec(sagas=sagas, **workload),
            faults=faults or FaultRates(),
            **options,
        )
    )


def invariants_broken(violations: Sequence[Violation]) -> set[str]:
    return {v.invariant for v in violations}


# ---------------------------------------------------------------- (a) no inbox


class InboxSwitchedOff(UnitOfWork):
    """Record the inbox row but always answer "not seen": every redelivery runs again."""

    async def seen(self, consumer: str, message: Message[Any]) -> bool:
        await super().seen(consumer, message)
        return False


def ledger_trusting_the_inbox() -> dict[str, dict[str, Any]]:
    """Ledger handlers that post every delivery they are handed.

    The production ledger names a posting after its fact (`capture:<order>`), so it is
    safe even without the inbox; this one leaves exactly-once to the inbox alone.
    """
    numbers = itertools.count(1)

    async def post(uow: UnitOfWork, message: Message[Any]) -> None:
        kind = Kind.CAPTURE if message.type == PaymentAuthorized.message_type else Kind.REFUND
        postings = ledger_rules.postings_for(kind, message.payload.amount)
        if not postings:
            return
        order_id = message.payload.order_id
        transaction_id = f"{ledger_rules.transaction_id(kind, order_id)}#{next(numbers)}"
        store = LedgerStore(uow.connection)
        await store.open_transaction(transaction_id, order_id, kind, uow.now())
        await store.add_entries(transaction_id, postings)
        await store.apply_balances(ledger_rules.balance_changes(postings))

    return {"ledger": {PaymentAuthorized.message_type: post, PaymentRefunded.message_type: post}}


# ---------------------------------------------------------------- (b) compensation skipped


async def release_nothing(uow: UnitOfWork, message: Message[ReleaseStock]) -> None:
    """Confirm the release as the real handler would, but keep the stock reserved."""
    order_id = message.payload.order_id
    existing = await StockStore(uow.connection).reservation(order_id)
    uow.send(stock_rules.decide_release(existing, order_id).event)


STOCK_NEVER_RELEASED = {"stock": {ReleaseStock.message_type: release_nothing}}

#: The same, as a variant a swarm worker or `compensa simulate --variant` loads by name.
STOCK_NEVER_RELEASED_VARIANT = {"handler_overrides": STOCK_NEVER_RELEASED}


# ---------------------------------------------------------------- (d) a participant that never answers


async def release_silently(uow: UnitOfWork, message: Message[ReleaseStock]) -> None:
    """Swallow the release: no effect and no reply, however often it is resent."""


#: Stock never answers a release, once faults stop as before: the saga cannot end.
STOCK_NEVER_ANSWERS_VARIANT = {"handler_overrides": {"stock": {ReleaseStock.message_type: release_silently}}}


# ---------------------------------------------------------------- (e) non-determinism


async def release_on_a_whim(uow: UnitOfWork, message: Message[ReleaseStock]) -> None:
    """Release as the product does, but fail now and then by the process-wide RNG, which no seed governs."""
    if random.random() < 0.5:  # the point: a draw outside the run's seeded rng
        raise TransientError("flaky by the global random module")
    await handle_release_stock(uow, message)


#: A build whose runs a seed cannot replay: the determinism self-check must catch it.
GLOBAL_RANDOM_VARIANT = {"handler_overrides": {"stock": {ReleaseStock.message_type: release_on_a_whim}}}


async def release_in_hash_order(uow: UnitOfWork, message: Message[ReleaseStock]) -> None:
    """Release as the product does, except for orders whose id a two-string set yields first.

    Which string a set yields first follows their hashes, which Python salts per process
    (PYTHONHASHSEED): the same in every run of one process, different in another.
    """
    order_id = message.payload.order_id
    if next(iter({order_id, "release"})) == order_id:  # the point: iteration order of a set of strings
        raise TransientError("refused by the hash order of a set")
    await handle_release_stock(uow, message)


#: A build a second run in the same process replays, and a process with another hash seed does not.
HASH_ORDER_VARIANT = {"handler_overrides": {"stock": {ReleaseStock.message_type: release_in_hash_order}}}

#: The order saga with every compensation removed from its definition.
SAGA_WITHOUT_COMPENSATIONS = Orchestrator(
    [replace(ORDER_SAGA, steps=tuple(replace(step, compensation=None) for step in ORDER_SAGA.steps))]
)


# ---------------------------------------------------------------- (c) lossy relay


class LossyPublisher:
    """Drop some messages but report success, so the relay marks them sent."""

    def __init__(self, inner: Publisher, loss: float = 0.1, seed: int = 7) -> None:
        self.inner = inner
        self.loss = loss
        self.rng = random.Random(seed)
        self.dropped: list[str] = []

    async def publish_batch(self, messages: Sequence[OutgoingMessage]) -> None:
        kept = []
        for message in messages:
            if self.rng.random() < self.loss:
                self.dropped.append(message.message_id)
            else:
                kept.append(message)
        await self.inner.publish_batch(kept)


# ---------------------------------------------------------------- an app that cannot be simulated

#: The trip app without its simulation pieces: it runs on the real stack, but has nothing to simulate.
TRIP_WITHOUT_SIMULATION = replace(trip_app, simulation=None)
