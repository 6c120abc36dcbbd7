"""The broker topology, named once: exchanges, work queues, delay queues, dead-letter queues."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from contracts import messages as m
from contracts.envelope import TRACEPARENT_PATTERN
from contracts.export import AmqpExchange, AmqpQueue, AmqpTopology
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


def consuming_queue(queue_name: str, message_type: str, queues: Sequence[QueueSpec] = WORK_QUEUES) -> QueueSpec | None:
    """The work queue (of `queues`, the order app's by default) a dead letter of `message_type` from `queue_name` goes back to.

    Its own queue if that still consumes the type; the queue the type moved to if the
    binding was retired (an `order.created` dead-lettered from saga.events before
    saga.starts existed goes to saga.starts); else None.
    """
    queue = next((q for q in queues if q.name == queue_name), None)
    if queue is None:
        return None
    if message_type in queue.routing_keys:
        return queue
    if (queue, message_type) in RETIRED_BINDINGS:
        return next((q for q in queues if q.service == queue.service and message_type in q.routing_keys and q != queue), None)
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

#: What each header a message may carry holds: the schema the AsyncAPI document gives it.
HEADER_SCHEMAS: dict[str, dict[str, Any]] = {
    "traceparent": {
        "type": "string",
        "pattern": TRACEPARENT_PATTERN,
        "description": "W3C trace context of the message's creation (the envelope's traceparent).",
    },
    H_ATTEMPT: {
        "type": "integer",
        "minimum": 1,
        "description": "Which delivery attempt this is: 2 after the first retry; on a dead letter, the attempts made.",
    },
    H_DEFERRED_SINCE: {
        "type": "string",
        "format": "date-time",
        "description": "When the message was first deferred (retried without using an attempt, e.g. an open breaker).",
    },
    H_REASON_CLASS: {
        "type": "string",
        "description": "Class of the last failure: transient, contract, a deferral's reason, retry_unroutable, …",
    },
    H_REASON: {"type": "string", "maxLength": 2000, "description": "Text of the last failure."},
    H_ORIGINAL_EXCHANGE: {"type": "string", "description": "The exchange the message was first published to."},
    H_ORIGINAL_ROUTING_KEY: {"type": "string", "description": "The routing key it was first published with."},
    H_ORIGINAL_QUEUE: {"type": "string", "description": "The work queue it failed in."},
    H_FIRST_FAILURE: {"type": "string", "format": "date-time", "description": "When it first failed."},
    H_LAST_FAILURE: {"type": "string", "format": "date-time", "description": "When it last failed."},
    H_SAGA_ID: {"type": "string", "description": "The saga it belongs to, when known."},
}
#: The headers every dead letter carries (the saga id only when it is known).
DEAD_LETTER_HEADERS = (
    H_ATTEMPT,
    H_REASON_CLASS,
    H_REASON,
    H_ORIGINAL_EXCHANGE,
    H_ORIGINAL_ROUTING_KEY,
    H_ORIGINAL_QUEUE,
    H_FIRST_FAILURE,
    H_LAST_FAILURE,
)

#: Where the document says the broker is: the compose service and a local one.
SERVERS = {
    "compose": ("rabbitmq:5672", "RabbitMQ of compose.yaml, as the services reach it."),
    "local": ("localhost:5672", "A RabbitMQ on this machine (COMPENSA_AMQP_URL)."),
}

_EXCHANGE_DESCRIPTIONS = {
    EVENTS.name: "Durable topic exchange of every event.",
    COMMANDS.name: "Durable direct exchange of every command.",
    DLX.name: "Durable direct exchange every work queue dead-letters to; it routes to <queue>.dlq.",
}


def amqp_topology(retry_delays_ms: Sequence[int], queue_type: str = "classic") -> AmqpTopology:
    """The topology `declare_topology` declares with these retry delays, for the AsyncAPI document."""

    def exchange(spec: ExchangeSpec) -> AmqpExchange:
        return AmqpExchange(spec.name, spec.type, _EXCHANGE_DESCRIPTIONS[spec.name])

    queues: list[AmqpQueue] = []
    for queue in WORK_QUEUES:
        queues.append(
            AmqpQueue(
                queue.name,
                "work",
                queue.service,
                queue.routing_keys,
                queue.exchange.name,
                queue.routing_keys,
                {"x-queue-type": queue_type, "x-dead-letter-exchange": DLX.name, "x-dead-letter-routing-key": queue.name},
            )
        )
        for delay_ms in retry_delays_ms:
            queues.append(
                AmqpQueue(
                    queue.delay_queue(delay_ms),
                    "delay",
                    queue.service,
                    queue.routing_keys,
                    None,
                    (),
                    {
                        "x-queue-type": queue_type,
                        "x-message-ttl": delay_ms,
                        "x-dead-letter-exchange": "",
                        "x-dead-letter-routing-key": queue.name,
                    },
                    returns_to=queue.name,
                    delay_ms=delay_ms,
                )
            )
        queues.append(
            AmqpQueue(
                queue.dlq,
                "dead_letter",
                "dlq",
                queue.routing_keys,
                DLX.name,
                (queue.name,),
                {"x-queue-type": queue_type},
                returns_to=queue.name,
            )
        )
    return AmqpTopology(
        servers=SERVERS,
        exchanges=(exchange(EVENTS), exchange(COMMANDS)),
        dead_letter_exchange=exchange(DLX),
        queues=tuple(queues),
        headers=HEADER_SCHEMAS,
        dead_letter_headers=DEAD_LETTER_HEADERS,
    )
