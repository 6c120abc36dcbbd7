"""The catalogue's instruments, made once through the OpenTelemetry metrics API.

They are made at import, before any meter provider may be installed: the API's proxy
instruments forward to the provider that `configure_telemetry` installs later, and cost
next to nothing while none is (the simulator, tests, CLI commands).
"""

from __future__ import annotations

from typing import Any

from opentelemetry import metrics

from infra.telemetry import catalogue as c

meter = metrics.get_meter("compensa")


def _counter(spec: c.MetricSpec) -> metrics.Counter:
    return meter.create_counter(spec.name, unit=spec.unit, description=spec.description)


def _histogram(spec: c.MetricSpec) -> metrics.Histogram:
    return meter.create_histogram(
        spec.name, unit=spec.unit, description=spec.description, explicit_bucket_boundaries_advisory=c.DURATION_BUCKETS
    )


def _gauge(spec: c.MetricSpec) -> Any:
    return meter.create_gauge(spec.name, unit=spec.unit, description=spec.description)


sagas_started = _counter(c.SAGAS_STARTED)
saga_outcomes = _counter(c.SAGA_OUTCOMES)
saga_duration = _histogram(c.SAGA_DURATION)
saga_step_duration = _histogram(c.SAGA_STEP_DURATION)
saga_compensation_duration = _histogram(c.SAGA_COMPENSATION_DURATION)
saga_deadlines_fired = _counter(c.SAGA_DEADLINES_FIRED)
sagas_active = _gauge(c.SAGAS_ACTIVE)
consumer_messages = _counter(c.CONSUMER_MESSAGES)
consumer_handler_duration = _histogram(c.CONSUMER_HANDLER_DURATION)
outbox_published = _counter(c.OUTBOX_PUBLISHED)
outbox_pending = _gauge(c.OUTBOX_PENDING)
outbox_oldest_age = _gauge(c.OUTBOX_OLDEST_AGE)
dead_letters_archived = _counter(c.DEAD_LETTERS_ARCHIVED)
dead_letters_new = _gauge(c.DEAD_LETTERS_NEW)
api_requests = _counter(c.API_REQUESTS)
api_request_duration = _histogram(c.API_REQUEST_DURATION)
api_idempotent_replays = _counter(c.API_IDEMPOTENT_REPLAYS)
api_rate_limited = _counter(c.API_RATE_LIMITED)
payment_gateway_calls = _counter(c.PAYMENT_GATEWAY_CALLS)
payment_gateway_duration = _histogram(c.PAYMENT_GATEWAY_DURATION)
circuit_state = _gauge(c.CIRCUIT_STATE)
circuit_transitions = _counter(c.CIRCUIT_TRANSITIONS)
