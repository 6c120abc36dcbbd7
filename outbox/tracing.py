"""W3C trace context carried in the envelope and in AMQP headers, and the outbox's spans.

Spans follow OpenTelemetry's messaging conventions: a message carries its *creation
context* (envelope ``traceparent`` and the AMQP header), and the relay's or dispatcher's
*send* span and every consumer's *process* span are children of it, so one saga is one
trace however many processes, retries and restarts it crosses. The creation context is
the span that wrote the message to the outbox (a handler's *process* span, the API's
request span, the caller's span), a custom creation context as the conventions allow;
only a write outside any span opens a *create* span of its own, the root of its trace.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

tracer = trace.get_tracer("compensa")

MESSAGING_SYSTEM = "rabbitmq"


def traceparent_of(span_context: trace.SpanContext) -> str | None:
    """The W3C traceparent of a span context (None when it is not a valid one)."""
    if not span_context.is_valid:
        return None
    return f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-{int(span_context.trace_flags):02x}"


def current_traceparent() -> str | None:
    """Return the traceparent of the active span, or None when no trace is active."""
    return traceparent_of(trace.get_current_span().get_span_context())


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


def creation_traceparent(
    message_type: str, destination: str, message_id: str, conversation_id: str, parent: str | None = None
) -> str | None:
    """The traceparent a message written now carries: the active span's, or else a *create* span's.

    A span per outbox write would be a third of the spans of a saga and of what
    exporting them costs, and would say no more than the span that wrote the message
    and the message's *send* span (which names its message id) already say.
    """
    active = trace.get_current_span().get_span_context()
    if active.is_valid:
        return traceparent_of(active)
    return create_span_traceparent(message_type, destination, message_id, conversation_id, parent)


def create_span_traceparent(
    message_type: str, destination: str, message_id: str, conversation_id: str, parent: str | None = None
) -> str | None:
    """Open and close the *create* span of an outbox write; its traceparent goes with the message.

    The span is a child of the active span, or of `parent` (the incoming message's
    context) when no span is active. None when tracing is off (no SDK installed):
    the message then carries `parent` on unchanged.
    """
    context = None if trace.get_current_span().get_span_context().is_valid else context_from(parent)
    span = tracer.start_span(
        f"create {message_type}",
        context=context,
        kind=trace.SpanKind.PRODUCER,
        attributes={
            "messaging.system": MESSAGING_SYSTEM,
            "messaging.operation.type": "create",
            "messaging.operation.name": "create",
            "messaging.destination.name": destination,
            "messaging.message.id": message_id,
            "messaging.message.conversation_id": conversation_id,
        },
    )
    span.end()
    return traceparent_of(span.get_span_context()) or parent


def publish_spans(messages: Any) -> list[trace.Span]:
    """One *send* span per outgoing message, each a child of the message's creation context."""
    spans = []
    for message in messages:
        attributes: dict[str, str | int] = {
            "messaging.system": MESSAGING_SYSTEM,
            "messaging.operation.type": "send",
            "messaging.operation.name": "publish",
            "messaging.destination.name": message.exchange,
            "messaging.rabbitmq.destination.routing_key": message.routing_key,
            "messaging.message.id": message.message_id,
            "messaging.message.conversation_id": message.correlation_id,
        }
        if len(messages) > 1:  # the conventions set the batch size on batches only
            attributes["messaging.batch.message_count"] = len(messages)
        spans.append(
            tracer.start_span(
                f"send {message.exchange or '(default)'}",
                context=context_from(None, message.headers),
                kind=trace.SpanKind.PRODUCER,
                attributes=attributes,
            )
        )
    return spans


def end_spans(spans: list[trace.Span], error: BaseException | None = None) -> None:
    for span in spans:
        if error is not None:
            span.record_exception(error)
            span.set_status(trace.Status(trace.StatusCode.ERROR, type(error).__name__))
        span.end()
