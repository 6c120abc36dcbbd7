"""W3C trace context carried in the envelope and in AMQP headers."""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry import context as otel_context
from opentelemetry import propagate


def current_traceparent() -> str | None:
    """Return the traceparent of the active span, or None when no trace is active."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent")


def context_from(traceparent: str | None, headers: Mapping[str, object] | None = None) -> otel_context.Context:
    """Rebuild the producer's trace context from the envelope (or headers)."""
    carrier: dict[str, str] = {}
    if headers:
        for key in ("traceparent", "tracestate"):
            value = headers.get(key)
            if isinstance(value, bytes):
                value = value.decode()
            if isinstance(value, str):
                carrier[key] = value
    if traceparent:
        carrier["traceparent"] = traceparent
    return propagate.extract(carrier)
