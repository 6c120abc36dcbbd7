"""One call per process: traces and metrics configured from the standard ``OTEL_*`` variables.

- ``OTEL_SDK_DISABLED=true``: nothing is installed; an incoming trace context still passes
  through messages unchanged.
- Traces: ``OTEL_TRACES_EXPORTER`` (``otlp``, ``console``, ``none``; comma-separated).
  Unset, traces are exported over OTLP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
  ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set, and not at all otherwise: compensa does not
  send to a default local endpoint nobody asked for. OTLP goes over HTTP/protobuf.
- Metrics: ``OTEL_METRICS_EXPORTER`` (``otlp``, ``console``, ``prometheus``, ``none``), the
  same default; and a Prometheus ``/metrics`` endpoint on ``COMPENSA_METRICS_PORT`` /
  ``--metrics-port`` (``prometheus`` alone uses ``OTEL_EXPORTER_PROMETHEUS_HOST``/``_PORT``,
  default port 9464).
- ``OTEL_SERVICE_NAME`` names the process in traces (default: ``compensa-<role>``);
  ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``/``_ARG``, ``OTEL_BSP_*``,
  ``OTEL_METRIC_EXPORT_INTERVAL`` and the exporters' own variables work as the SDK documents.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from opentelemetry import metrics
from opentelemetry.sdk.resources import Resource

from infra.telemetry.tracing import install_tracer_provider, installed_provider

log = structlog.get_logger("compensa.telemetry")

TRACE_EXPORTERS = ("otlp", "console")
METRIC_EXPORTERS = ("otlp", "console", "prometheus")
DEFAULT_PROMETHEUS_PORT = 9464
_SUPPORTED_PROTOCOL = "http/protobuf"


@dataclass(frozen=True)
class TelemetryConfig:
    """What the environment asks for, checked before anything is installed."""

    service_name: str
    disabled: bool = False
    trace_exporters: tuple[str, ...] = ()
    metric_exporters: tuple[str, ...] = ()
    #: Where /metrics is served, or None.
    prometheus: tuple[str, int] | None = None


def _flag(environ: Mapping[str, str], name: str) -> bool:
    value = environ.get(name, "").strip().lower()
    if value in ("", "false", "0", "no"):
        return False
    if value in ("true", "1", "yes"):
        return True
    raise ValueError(f"{name}={environ[name]!r}: expected true or false")


def _exporters(environ: Mapping[str, str], name: str, known: tuple[str, ...], signal: str) -> tuple[str, ...]:
    raw = environ.get(name)
    if raw is None or not raw.strip():
        endpoint = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")
        return ("otlp",) if endpoint else ()
    names = tuple(dict.fromkeys(part.strip().lower() for part in raw.split(",") if part.strip()))
    if "none" in names:
        if len(names) > 1:
            raise ValueError(f"{name}={raw!r}: 'none' cannot be combined with other exporters")
        return ()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{name}={raw!r}: unknown exporter {unknown[0]!r}; compensa supports {', '.join((*known, 'none'))}")
    return names


def _check_protocol(environ: Mapping[str, str], signal: str) -> None:
    for name in ("OTEL_EXPORTER_OTLP_PROTOCOL", f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL"):
        value = environ.get(name, "").strip()
        if value and value != _SUPPORTED_PROTOCOL:
            raise ValueError(f"{name}={value!r}: compensa exports OTLP over HTTP; set it to {_SUPPORTED_PROTOCOL!r}")


def _port(value: str, name: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected a TCP port number") from None
    if not 0 < port < 65536:
        raise ValueError(f"{name}={value!r}: expected a TCP port number (1-65535)")
    return port


def telemetry_config(
    default_service_name: str,
    *,
    metrics_port: int | None = None,
    metrics_host: str = "0.0.0.0",  # noqa: S104 - a scrape target listens where Prometheus can reach it
    environ: Mapping[str, str] | None = None,
) -> TelemetryConfig:
    """Read and check the OTEL_* variables; ValueError names the one that is wrong."""
    env = os.environ if environ is None else environ
    service_name = env.get("OTEL_SERVICE_NAME", "").strip() or default_service_name
    if _flag(env, "OTEL_SDK_DISABLED"):
        return TelemetryConfig(service_name, disabled=True)
    traces = _exporters(env, "OTEL_TRACES_EXPORTER", TRACE_EXPORTERS, "TRACES")
    metric_exporters = _exporters(env, "OTEL_METRICS_EXPORTER", METRIC_EXPORTERS, "METRICS")
    if "otlp" in traces:
        _check_protocol(env, "TRACES")
    if "otlp" in metric_exporters:
        _check_protocol(env, "METRICS")
    prometheus: tuple[str, int] | None = None
    if metrics_port is not None:
        prometheus = (metrics_host, metrics_port)
    elif "prometheus" in metric_exporters:
        host = env.get("OTEL_EXPORTER_PROMETHEUS_HOST", "").strip() or "localhost"
        port = env.get("OTEL_EXPORTER_PROMETHEUS_PORT", "").strip()
        prometheus = (host, _port(port, "OTEL_EXPORTER_PROMETHEUS_PORT") if port else DEFAULT_PROMETHEUS_PORT)
    return TelemetryConfig(
        service_name,
        trace_exporters=traces,
        metric_exporters=tuple(n for n in metric_exporters if n != "prometheus"),
        prometheus=prometheus,
    )


@dataclass
class Telemetry:
    """What `configure_telemetry` installed in this process."""

    config: TelemetryConfig
    tracer_provider: Any = None
    meter_provider: Any = None
    #: (host, port) of the /metrics endpoint actually bound.
    metrics_address: tuple[str, int] | None = None
    _server: Any = None

    def shutdown(self) -> None:
        """Flush what is buffered (spans, metrics) and stop the /metrics endpoint."""
        if self.tracer_provider is not None:
            self.tracer_provider.force_flush()
        if self.meter_provider is not None:
            self.meter_provider.force_flush()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


_installed: Telemetry | None = None


def _install_metrics(resource: Resource, config: TelemetryConfig) -> tuple[Any, Any, tuple[str, int] | None]:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, MetricReader, PeriodicExportingMetricReader

    readers: list[MetricReader] = []
    for name in config.metric_exporters:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        else:
            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
    server = address = None
    if config.prometheus is not None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server

        readers.append(PrometheusMetricReader())
        host, port = config.prometheus
        try:
            server, _thread = start_http_server(port, addr=host)
        except OSError as exc:
            raise ValueError(f"cannot serve /metrics on {host}:{port}: {exc.strerror or exc}") from None
        address = (host, server.server_address[1])
    if not readers:
        return None, None, None
    provider = MeterProvider(resource=resource, metric_readers=readers)
    metrics.set_meter_provider(provider)
    return provider, server, address


def configure_telemetry(
    default_service_name: str,
    *,
    metrics_port: int | None = None,
    metrics_host: str = "0.0.0.0",  # noqa: S104 - see telemetry_config
    environ: Mapping[str, str] | None = None,
) -> Telemetry:
    """Install tracing and metrics for this process once; later calls return what was installed.

    A tracer provider installed before (a test's) is kept: OpenTelemetry allows one per process.
    """
    global _installed
    if _installed is not None:
        return _installed
    config = telemetry_config(default_service_name, metrics_port=metrics_port, metrics_host=metrics_host, environ=environ)
    telemetry = Telemetry(config)
    if not config.disabled:
        resource = Resource.create({"service.name": config.service_name})
        telemetry.tracer_provider = installed_provider() or install_tracer_provider(resource, config.trace_exporters)
        telemetry.meter_provider, telemetry._server, telemetry.metrics_address = _install_metrics(resource, config)
    _installed = telemetry
    if config.disabled and metrics_port is not None:
        # Asked for by name, dropped by the standard switch: say so rather than serve nothing.
        log.warning("telemetry.metrics_port_ignored", metrics_port=metrics_port, reason="OTEL_SDK_DISABLED=true")
    # Worth a line only when something leaves the process (a CLI command says nothing).
    exporting = bool(config.trace_exporters or config.metric_exporters or telemetry.metrics_address)
    (log.info if exporting else log.debug)(
        "telemetry.configured",
        service_name=config.service_name,
        disabled=config.disabled,
        traces=list(config.trace_exporters),
        metrics=list(config.metric_exporters),
        metrics_endpoint=f"http://{telemetry.metrics_address[0]}:{telemetry.metrics_address[1]}/metrics"
        if telemetry.metrics_address
        else None,
    )
    return telemetry


def metrics_installed() -> bool:
    """Whether this process exports metrics (gauges sampled from the database are worth their queries)."""
    return _installed is not None and _installed.meter_provider is not None
