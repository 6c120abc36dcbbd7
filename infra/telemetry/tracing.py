"""Tracer providers: the process's own, from the standard ``OTEL_*`` variables, or a test's."""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased


def installed_provider() -> TracerProvider | None:
    """The SDK provider this process installed already, if any (it can be installed once)."""
    current = trace.get_tracer_provider()
    return current if isinstance(current, TracerProvider) else None


def configure_tracing(service_name: str = "compensa", exporter: SpanExporter | None = None) -> TracerProvider:
    """Install a recording tracer provider once; spans go to `exporter` as they end (tests)."""
    provider = installed_provider()
    if provider is None:
        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        trace.set_tracer_provider(provider)
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def span_exporter(name: str) -> SpanExporter:
    if name == "otlp":
        # Reads OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, _HEADERS, _TIMEOUT, _COMPRESSION itself.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if name == "console":
        return ConsoleSpanExporter()
    raise ValueError(f"unknown trace exporter {name!r}")


def install_tracer_provider(resource: Resource, exporters: Sequence[str]) -> TracerProvider:
    """The process's tracer provider.

    With exporters, sampling follows OTEL_TRACES_SAMPLER (default: parent-based, always
    on) and spans leave in batches. Without any, spans are not recorded unless the
    caller's trace context asks for it, but they still get ids: a trace context still
    reaches every message and every log line, at the cost of an id per span.
    """
    if exporters:
        provider = TracerProvider(resource=resource)
        processors: list[SpanProcessor] = [BatchSpanProcessor(span_exporter(name)) for name in exporters]
    else:
        provider = TracerProvider(resource=resource, sampler=ParentBased(ALWAYS_OFF))
        processors = []
    for processor in processors:
        provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    return provider
