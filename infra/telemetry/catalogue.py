"""Every metric compensa exports: the one list the instruments, the docs and the dashboards follow.

Names are OpenTelemetry names; Prometheus sees them through the exporter's translation
(dots to underscores, the unit as a suffix, ``_total`` on counters), which
:func:`prometheus_name` reproduces so docs, alert rules and dashboards can be checked
against this list. Labels are closed sets (saga types, steps, queues, services,
statuses, reason classes, registered producers): never an order or message id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["counter", "histogram", "gauge"]

#: Seconds, from a fast hop (milliseconds) to a saga that waits out its deadlines (minutes).
DURATION_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)

_UNIT_SUFFIX = {"s": "seconds", "By": "bytes"}


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Kind
    #: UCUM: "s", or a `{annotation}` for a count (no Prometheus suffix).
    unit: str
    labels: tuple[str, ...]
    description: str

    @property
    def prometheus_name(self) -> str:
        return prometheus_name(self)


def prometheus_name(spec: MetricSpec) -> str:
    """The name Prometheus scrapes for `spec` (without histogram `_bucket`/`_sum`/`_count`)."""
    name = spec.name.replace(".", "_")
    suffix = _UNIT_SUFFIX.get(spec.unit)
    if suffix and not name.endswith("_" + suffix):
        name += "_" + suffix
    if spec.kind == "counter":
        name += "_total"
    return name


SAGAS_STARTED = MetricSpec("compensa.sagas.started", "counter", "{saga}", ("saga_type",), "Sagas started.")
SAGA_OUTCOMES = MetricSpec(
    "compensa.saga.outcomes",
    "counter",
    "{saga}",
    ("saga_type", "status"),
    "Sagas reaching a terminal status: completed, cancelled, rejected or compensation_failed "
    "(counted again if an operator's retry ends it anew).",
)
SAGA_DURATION = MetricSpec(
    "compensa.saga.duration",
    "histogram",
    "s",
    ("saga_type", "status"),
    "From a saga's start to its terminal status.",
)
SAGA_STEP_DURATION = MetricSpec(
    "compensa.saga.step.duration",
    "histogram",
    "s",
    ("saga_type", "step", "outcome"),
    "From a step's command to the reply or deadline that ends it; outcome succeeded, failed or timed_out.",
)
SAGA_COMPENSATION_DURATION = MetricSpec(
    "compensa.saga.compensation.duration",
    "histogram",
    "s",
    ("saga_type", "status"),
    "Time spent compensating: from the failure that starts compensation to the terminal status.",
)
SAGA_DEADLINES_FIRED = MetricSpec(
    "compensa.saga.deadlines.fired",
    "counter",
    "{deadline}",
    ("saga_type", "kind"),
    "Deadlines that fired (kind step or compensation): a participant did not answer in time.",
)
SAGAS_ACTIVE = MetricSpec(
    "compensa.sagas.active",
    "gauge",
    "{saga}",
    ("saga_type", "status"),
    "Sagas not finished, by status (running, compensating) and compensation_failed ones waiting for an operator; "
    "sampled from the database.",
)
CONSUMER_MESSAGES = MetricSpec(
    "compensa.consumer.messages",
    "counter",
    "{message}",
    ("queue", "outcome", "reason_class"),
    "Deliveries handled: outcome processed, duplicate, retried, deferred (retried without using an attempt: "
    "a circuit open) or dead_lettered; reason_class for the last three (transient, circuit_open, contract, "
    "business_rule, handler_error, ...), empty otherwise.",
)
CONSUMER_HANDLER_DURATION = MetricSpec(
    "compensa.consumer.handler.duration",
    "histogram",
    "s",
    ("queue", "message_type"),
    "One message's handler, inbox check included (the transaction's commit is not).",
)
OUTBOX_PUBLISHED = MetricSpec(
    "compensa.outbox.published",
    "counter",
    "{message}",
    ("service", "path"),
    "Outbox rows published to the broker with confirms: path dispatch (right after commit) or relay.",
)
OUTBOX_PENDING = MetricSpec(
    "compensa.outbox.pending", "gauge", "{message}", ("service",), "Outbox rows not published yet; sampled."
)
OUTBOX_OLDEST_AGE = MetricSpec(
    "compensa.outbox.oldest_pending.age",
    "gauge",
    "s",
    ("service",),
    "Age of the oldest unpublished outbox row (relay lag); sampled.",
)
DEAD_LETTERS_ARCHIVED = MetricSpec(
    "compensa.dead_letters.archived",
    "counter",
    "{message}",
    ("queue", "reason_class"),
    "Dead letters taken from a `<queue>.dlq` into the archive.",
)
DEAD_LETTERS_NEW = MetricSpec(
    "compensa.dead_letters.new", "gauge", "{message}", ("queue",), "Archived dead letters still `new`; sampled."
)
API_REQUESTS = MetricSpec(
    "compensa.api.requests",
    "counter",
    "{request}",
    ("route", "status_code", "producer"),
    "Ingest API requests by route template, HTTP status and authenticated producer (empty when unauthenticated).",
)
API_REQUEST_DURATION = MetricSpec(
    "compensa.api.request.duration", "histogram", "s", ("route",), "Ingest API request handling time."
)
API_IDEMPOTENT_REPLAYS = MetricSpec(
    "compensa.api.idempotent_replays",
    "counter",
    "{request}",
    ("producer",),
    "Requests answered from a stored response because their Idempotency-Key was seen.",
)
API_RATE_LIMITED = MetricSpec("compensa.api.rate_limited", "counter", "{request}", ("producer",), "Requests refused with 429.")
PAYMENT_GATEWAY_CALLS = MetricSpec(
    "compensa.payment_gateway.calls",
    "counter",
    "{call}",
    ("operation", "outcome"),
    "Calls to the payment gateway (authorize, refund): outcome succeeded, declined, failed (transient or an error) "
    "or rejected (the circuit was open: not called).",
)
PAYMENT_GATEWAY_DURATION = MetricSpec(
    "compensa.payment_gateway.duration",
    "histogram",
    "s",
    ("operation",),
    "Payment gateway call time (its P95 per payment is the gateway's latency users feel).",
)
CIRCUIT_STATE = MetricSpec(
    "compensa.circuit.state",
    "gauge",
    "{state}",
    ("circuit",),
    "A circuit breaker's state in this process: 0 closed, 1 half open, 2 open.",
)
CIRCUIT_TRANSITIONS = MetricSpec(
    "compensa.circuit.transitions",
    "counter",
    "{transition}",
    ("circuit", "state"),
    "Circuit breaker transitions, by the state entered.",
)

CATALOGUE: tuple[MetricSpec, ...] = (
    SAGAS_STARTED,
    SAGA_OUTCOMES,
    SAGA_DURATION,
    SAGA_STEP_DURATION,
    SAGA_COMPENSATION_DURATION,
    SAGA_DEADLINES_FIRED,
    SAGAS_ACTIVE,
    CONSUMER_MESSAGES,
    CONSUMER_HANDLER_DURATION,
    OUTBOX_PUBLISHED,
    OUTBOX_PENDING,
    OUTBOX_OLDEST_AGE,
    DEAD_LETTERS_ARCHIVED,
    DEAD_LETTERS_NEW,
    API_REQUESTS,
    API_REQUEST_DURATION,
    API_IDEMPOTENT_REPLAYS,
    API_RATE_LIMITED,
    PAYMENT_GATEWAY_CALLS,
    PAYMENT_GATEWAY_DURATION,
    CIRCUIT_STATE,
    CIRCUIT_TRANSITIONS,
)

#: The reason classes compensa writes (contracts' errors, the pipeline, the archive) and
#: RabbitMQ's own dead-letter reasons. A header is input: anything else counts as "other".
REASON_CLASSES = frozenset(
    {
        "",
        "error",
        "contract",
        "business_rule",
        "transient",
        "conflict",
        "deferred",
        "circuit_open",
        "transient_exhausted",
        "handler_error",
        "unknown",
        "archive_quarantined",
        "broker_rejected",
        "broker_expired",
        "broker_maxlen",
        "broker_delivery_limit",
        "broker_dead_lettered",
    }
)


def reason_class_label(value: str) -> str:
    """A reason class as a label value: one of a closed set."""
    return value if value in REASON_CLASSES else "other"
