"""The broker topology, named once: exchanges, work queues, delay queues, dead-letter queues."""

from __future__ import annotations

from dataclasses import dataclass

from contracts import messages as m
from contracts.routing import COMMANDS_EXCHANGE, DEAD_LETTER_EXCHANGE, EVENTS_EXCHANGE


@dataclass(frozen=True)
class ExchangeSpec:
    name: str
    type: str  # "topic" | "direct"


@dataclass(frozen=True)
class QueueSpec:
    """A durable work queue, the exchange it reads and the routing keys bound to it."""

    name: str
    service: str
    exchange: ExchangeSpec
    routing_keys: tuple[str, ...]

    @property
    def dlq(self) -> str:
        return f"{self.name}.dlq"

    def delay_queue(self, delay_ms: int) -> str:
        return f"{self.name}.retry.{delay_ms}ms"


EVENTS = ExchangeSpec(EVENTS_EXCHANGE, "topic")
COMMANDS = ExchangeSpec(COMMANDS_EXCHANGE, "direct")
DLX = ExchangeSpec(DEAD_LETTER_EXCHANGE, "direct")
EXCHANGES = (EVENTS, COMMANDS, DLX)


def _keys(*payloads: type[m.Payload]) -> tuple[str, ...]:
    return tuple(p.message_type for p in payloads)


#: Events that start a saga. A queue of their own, consumed behind an admission gate
#: (a bound on sagas in flight): a burst of new orders waits here, un-started, instead
#: of queueing in front of the replies that sagas already in flight are waiting for.
SAGA_STARTS = QueueSpec("saga.starts", "saga", EVENTS, _keys(m.OrderCreated))
#: Replies to the saga's commands and confirmations of its compensations.
SAGA_EVENTS = QueueSpec(
    "saga.events",
    "saga",
    EVENTS,
    _keys(
        m.StockReserved,
        m.StockReservationFailed,
        m.PaymentAuthorized,
        m.PaymentDeclined,
        m.StockCommitted,
        m.StockCommitFailed,
        m.StockReleased,
        m.PaymentRefunded,
    ),
)
STOCK_COMMANDS = QueueSpec("stock.commands", "stock", COMMANDS, _keys(m.ReserveStock, m.CommitStock, m.ReleaseStock))
PAYMENTS_COMMANDS = QueueSpec("payments.commands", "payments", COMMANDS, _keys(m.ChargePayment, m.RefundPayment))
LEDGER_EVENTS = QueueSpec("ledger.events", "ledger", EVENTS, _keys(m.PaymentAuthorized, m.PaymentRefunded))
ORDERS_EVENTS = QueueSpec(
    "orders.events", "orders", EVENTS, _keys(m.OrderCreated, m.OrderCompleted, m.OrderCancelled, m.OrderRejected)
)

WORK_QUEUES: tuple[QueueSpec, ...] = (
    SAGA_EVENTS,
    STOCK_COMMANDS,
    PAYMENTS_COMMANDS,
    LEDGER_EVENTS,
    ORDERS_EVENTS,
    SAGA_STARTS,
)


#: The dead-letter queues, as queues the archive (service "dlq") consumes.
DEAD_LETTER_QUEUES: tuple[QueueSpec, ...] = tuple(QueueSpec(queue.dlq, "dlq", DLX, (queue.name,)) for queue in WORK_QUEUES)


def queue_named(name: str) -> QueueSpec:
    for queue in WORK_QUEUES:
        if queue.name == name:
            return queue
    raise ValueError(f"unknown queue {name!r}; known: {', '.join(q.name for q in WORK_QUEUES)}")


#: Bindings earlier versions declared and this one does not want: `topology declare`
#: removes them (order.created moved from saga.events to saga.starts).
RETIRED_BINDINGS: tuple[tuple[QueueSpec, str], ...] = ((SAGA_EVENTS, m.OrderCreated.message_type),)


def consuming_queue(queue_name: str, message_type: str) -> QueueSpec | None:
    """The work queue a dead letter of `message_type` from `queue_name` goes back to.

    Its own queue if that still consumes the type; the queue the type moved to if the
    binding was retired (an `order.created` dead-lettered from saga.events before
    saga.starts existed goes to saga.starts); else None.
    """
    queue = next((q for q in WORK_QUEUES if q.name == queue_name), None)
    if queue is None:
        return None
    if message_type in queue.routing_keys:
        return queue
    if (queue, message_type) in RETIRED_BINDINGS:
        return next(
            (q for q in WORK_QUEUES if q.service == queue.service and message_type in q.routing_keys and q != queue), None
        )
    return None


def retry_delays_ms(max_attempts: int, base_seconds: float, max_seconds: float) -> list[int]:
    """Delay (ms) before attempt 2, 3, …, max_attempts: exponential, capped."""
    return [int(min(base_seconds * 2 ** (attempt - 1), max_seconds) * 1000) for attempt in range(1, max_attempts)]


# Headers compensa adds to a message on retry and dead-lettering.
H_ATTEMPT = "x-compensa-attempt"
#: When a message was first deferred (a `Deferred`: retried without using an attempt).
H_DEFERRED_SINCE = "x-compensa-deferred-since"
H_REASON_CLASS = "x-compensa-reason-class"
H_REASON = "x-compensa-reason"
H_ORIGINAL_EXCHANGE = "x-compensa-original-exchange"
H_ORIGINAL_ROUTING_KEY = "x-compensa-original-routing-key"
H_ORIGINAL_QUEUE = "x-compensa-original-queue"
H_FIRST_FAILURE = "x-compensa-first-failure-at"
H_LAST_FAILURE = "x-compensa-last-failure-at"
H_SAGA_ID = "x-compensa-saga-id"
