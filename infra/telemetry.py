"""OpenTelemetry setup: a tracer provider, exporting to the console or an OTLP-less sink."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter


def configure_tracing(service_name: str = "compensa", exporter: SpanExporter | None = None) -> TracerProvider:
    """Install a tracer provider once; spans go to `exporter` when one is given."""
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        provider = current
    else:
        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        trace.set_tracer_provider(provider)
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider
