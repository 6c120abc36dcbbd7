"""Saga applications as infra hosts them: the order app (the default), loading one by name,
its broker topology, its tables, and its footprint (what the operator commands watch).

`--app module:attr` names a `sagas.app.SagaApp`; `load_app` imports it, checks it and
registers its message contracts, so the consumer pipeline can decode them. Without
`--app` every command hosts `ORDER_APP`, built from the services compensa ships.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

import consumers.ledger as ledger
import consumers.orders as orders
import consumers.payments as payments
import consumers.stock as stock
from consumers.ledger.tables import ledger_balances, ledger_entries, ledger_transactions
from consumers.orders.tables import orders_orders
from consumers.payments.tables import payments_charges
from consumers.stock.tables import stock_items, stock_reservations
from contracts import messages as m
from contracts.envelope import REGISTRY
from infra import topology as t
from infra.references import attribute_of, import_from, split_reference
from outbox.tables import SERVICES, register_service
from sagas.app import AppHandler, Participant, SagaApp
from sagas.order_saga import ORDER_SAGA

if TYPE_CHECKING:
    from collections.abc import Mapping

    from infra.bootstrap import Parts


def _stock_handlers(parts: Parts) -> Mapping[str, AppHandler]:
    return stock.make_handlers(reservation_ttl=timedelta(seconds=parts.settings.reservation_ttl_seconds))


def _payments_handlers(parts: Parts) -> Mapping[str, AppHandler]:
    return payments.make_handlers(parts.gateway)


#: The order saga and the services compensa ships: what every command hosts without `--app`.
#: Its queues are the named constants of infra/topology.py (`app_queues`), its tables are
#: built by compensa's own migrations, and its simulation is built in (infra/simulation).
ORDER_APP = SagaApp(
    name="order",
    description="reserve stock -> charge payment -> commit stock; release and refund to compensate",
    sagas=(ORDER_SAGA,),
    messages=(*m.EVENTS, *m.COMMANDS),
    participants=(
        Participant(
            "stock",
            t.STOCK_COMMANDS.name,
            _stock_handlers,
            consumes=(m.ReserveStock, m.CommitStock, m.ReleaseStock),
            tables=(stock_items, stock_reservations),
            # Its handlers lock the SKU counters that many messages share: see infra/bootstrap.py.
            serial_batches=True,
            lock_batch=stock.lock_batch,
        ),
        Participant(
            "payments",
            t.PAYMENTS_COMMANDS.name,
            _payments_handlers,
            consumes=(m.ChargePayment, m.RefundPayment),
            tables=(payments_charges,),
        ),
        Participant(
            "ledger",
            t.LEDGER_EVENTS.name,
            ledger.HANDLERS,
            tables=(ledger_transactions, ledger_entries, ledger_balances),
            faulty=False,
            serial_batches=True,
            lock_batch=ledger.lock_batch,
        ),
        Participant("orders", t.ORDERS_EVENTS.name, orders.HANDLERS, tables=(orders_orders,), faulty=False),
    ),
    outcomes=(m.OrderCompleted, m.OrderCancelled, m.OrderRejected),
)


class AppLoadError(ValueError):
    """`--app` names nothing that loads, or something that is not a saga application."""


def load_app(reference: str, search_path: str | None = None) -> SagaApp:
    """The `SagaApp` that `module:attr` names, its contracts registered.

    `search_path` (default: the working directory) goes first on `sys.path`, as
    `uvicorn module:app` does, so an application next to the command is found.
    """
    parts = split_reference(reference)
    if parts is None:
        raise AppLoadError(f"--app: expected module:attribute, got {reference!r}")
    module_name, attribute = parts
    try:
        module = import_from(module_name, search_path)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise AppLoadError(f"--app {reference}: no module named {exc.name!r}") from None
        raise AppLoadError(f"--app {reference}: importing {module_name} failed: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any import-time error of the user's module, said in one line
        raise AppLoadError(f"--app {reference}: importing {module_name} failed: {type(exc).__name__}: {exc}") from None
    try:
        target = attribute_of(module, attribute)
    except AttributeError:
        raise AppLoadError(f"--app {reference}: module {module_name} has no attribute {attribute!r}") from None
    if not isinstance(target, SagaApp):
        raise AppLoadError(f"--app {reference}: {attribute} is a {type(target).__name__}, not a sagas.app.SagaApp")
    try:
        REGISTRY.extend(target.messages)
    except ValueError as exc:
        raise AppLoadError(f"--app {reference}: {exc}") from None
    for participant in target.participants:
        register_service(participant.name)
    return target


def resolve_app(reference: str | None, search_path: str | None = None) -> SagaApp:
    """The app `reference` names, or the order app when it is None."""
    return ORDER_APP if reference is None else load_app(reference, search_path)


def app_queues(app: SagaApp) -> tuple[t.QueueSpec, ...]:
    """The app's work queues: the saga service's two, and one per participant.

    The order app's are the named constants of infra/topology.py, in their order (the
    simulator draws among queues in this order, so a seed replays the same run).
    """
    if app is ORDER_APP:
        return t.WORK_QUEUES
    by_type = {model.message_type: model for model in app.messages}
    participants = []
    for participant in app.participants:
        types = participant.message_types()
        exchange = t.COMMANDS if by_type[types[0]].kind == "command" else t.EVENTS
        participants.append(t.QueueSpec(participant.queue, participant.name, exchange, types))
    return (
        t.QueueSpec(app.saga_events_queue, "saga", t.EVENTS, app.replies()),
        *participants,
        t.QueueSpec(app.saga_starts_queue, "saga", t.EVENTS, app.starts()),
    )


def dead_letter_queues(queues: tuple[t.QueueSpec, ...]) -> tuple[t.QueueSpec, ...]:
    """The dead-letter queues of `queues`, as queues the archive consumes."""
    if queues == t.WORK_QUEUES:
        return t.DEAD_LETTER_QUEUES
    return tuple(t.QueueSpec(queue.dlq, "dlq", t.DLX, (queue.name,)) for queue in queues)


#: compensa's own outboxes that every app writes through: the saga service's commands and
#: outcomes, the starts accepted from upstream (`ingest`), and dead-letter replays (`dlq`).
SHARED_OUTBOXES = ("saga", "ingest", "dlq")


@dataclass(frozen=True)
class Footprint:
    """What a hosted app occupies: its work queues, their dead-letter queues and its outboxes.

    `compensa health`, `outbox status`, `dlq` and the console watch these (`footprint`).
    """

    queues: tuple[t.QueueSpec, ...]
    dead_letter_queues: tuple[t.QueueSpec, ...]
    outboxes: tuple[str, ...]

    @property
    def queue_names(self) -> list[str]:
        return [queue.name for queue in self.queues]

    def consuming_queue(self, queue_name: str, message_type: str) -> t.QueueSpec | None:
        """The queue of this app a dead letter of `message_type` from `queue_name` goes back to (`t.consuming_queue`)."""
        return t.consuming_queue(queue_name, message_type, self.queues)


def footprint(app: SagaApp) -> Footprint:
    """The app's work queues, dead-letter queues and outboxes: its participants', and compensa's it writes through.

    The order app's are the named constants (infra/topology.py, outbox/tables.py), in their order.
    """
    queues = app_queues(app)
    if app is ORDER_APP:
        outboxes: Iterable[str] = SERVICES
    else:
        outboxes = (*(participant.name for participant in app.participants), *SHARED_OUTBOXES)
    return Footprint(queues, dead_letter_queues(queues), tuple(outboxes))


async def create_app_tables(engine: AsyncEngine, app: SagaApp) -> list[str]:
    """Create the app's participant tables and their outboxes and inboxes (if missing); return their names.

    compensa's migrations build its own schema (the order app's tables included); an
    app's tables are created from its metadata. An app whose tables change over time
    owns their migrations: this only ever creates what is missing.
    """
    if app is ORDER_APP:
        return []
    tables = [*app.tables()]
    for participant in app.participants:
        service = register_service(participant.name)
        tables += [service.outbox, service.inbox]

    def create(sync: Connection) -> None:
        for table in tables:
            table.create(sync, checkfirst=True)

    async with engine.begin() as connection:
        await connection.run_sync(create)
    return [table.name for table in tables]


__all__ = [
    "ORDER_APP",
    "SHARED_OUTBOXES",
    "AppLoadError",
    "Footprint",
    "app_queues",
    "create_app_tables",
    "dead_letter_queues",
    "footprint",
    "load_app",
    "resolve_app",
]
