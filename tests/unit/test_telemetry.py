"""Telemetry set-up from OTEL_* variables, the metrics catalogue, and saga metrics from transitions."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import REGISTRY
from prometheus_client.exposition import generate_latest

from infra.telemetry.catalogue import CATALOGUE, REASON_CLASSES, reason_class_label
from infra.telemetry.saga_metrics import step_outcome
from infra.telemetry.setup import telemetry_config
from sagas import ORDER_SAGA, SagaState, SagaStatus
from sagas.orchestrator import AppliedTransition

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- OTEL_* variables


def test_nothing_is_exported_unless_asked() -> None:
    config = telemetry_config("compensa-saga", environ={})
    assert (config.service_name, config.trace_exporters, config.metric_exporters, config.prometheus) == (
        "compensa-saga",
        (),
        (),
        None,
    )


def test_an_otlp_endpoint_turns_on_otlp_traces_and_metrics_and_the_service_name_is_the_users() -> None:
    config = telemetry_config(
        "compensa-saga", environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SERVICE_NAME": "orders-eu"}
    )
    assert (config.service_name, config.trace_exporters, config.metric_exporters) == ("orders-eu", ("otlp",), ("otlp",))


def test_exporters_named_explicitly_and_none() -> None:
    env = {"OTEL_TRACES_EXPORTER": "console, otlp", "OTEL_METRICS_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}
    config = telemetry_config("x", environ=env)
    assert (config.trace_exporters, config.metric_exporters) == (("console", "otlp"), ())


def test_prometheus_by_port_or_by_the_standard_variables() -> None:
    assert telemetry_config("x", metrics_port=9100, metrics_host="127.0.0.1", environ={}).prometheus == ("127.0.0.1", 9100)
    config = telemetry_config("x", environ={"OTEL_METRICS_EXPORTER": "prometheus", "OTEL_EXPORTER_PROMETHEUS_PORT": "9555"})
    assert (config.prometheus, config.metric_exporters) == (("localhost", 9555), ())


def test_sdk_disabled_installs_nothing() -> None:
    config = telemetry_config("x", metrics_port=9100, environ={"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"})
    assert config.disabled and config.trace_exporters == () and config.prometheus is None


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OTEL_TRACES_EXPORTER": "jaeger"}, "OTEL_TRACES_EXPORTER='jaeger': unknown exporter 'jaeger'"),
        ({"OTEL_METRICS_EXPORTER": "none,otlp"}, "OTEL_METRICS_EXPORTER='none,otlp': 'none' cannot be combined"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "OTEL_EXPORTER_OTLP_PROTOCOL='grpc': compensa exports OTLP over HTTP",
        ),
        ({"OTEL_SDK_DISABLED": "maybe"}, "OTEL_SDK_DISABLED='maybe': expected true or false"),
        (
            {"OTEL_METRICS_EXPORTER": "prometheus", "OTEL_EXPORTER_PROMETHEUS_PORT": "99999"},
            "OTEL_EXPORTER_PROMETHEUS_PORT='99999': expected a TCP port number",
        ),
    ],
)
def test_a_wrong_variable_is_named_in_the_error(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        telemetry_config("x", environ=env)


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "infra.cli", *args]
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)


def test_a_bad_otel_variable_is_one_error_line_not_a_traceback(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "COMPENSA_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/c.db",
        "OTEL_TRACES_EXPORTER": "zipkin",
    }
    result = run_cli("outbox", "status", env=env)
    assert result.returncode == 1
    assert "OTEL_TRACES_EXPORTER='zipkin': unknown exporter 'zipkin'" in result.stderr
    assert "Traceback" not in result.stderr


def test_metrics_port_without_serve_is_refused(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "COMPENSA_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/c.db"}
    result = run_cli("health", "--metrics-port", "9464", env=env)
    assert result.returncode == 2 and "--metrics-port needs --serve" in result.stderr


def test_log_lines_carry_the_active_trace(tmp_path: Path) -> None:
    script = """
import io, json
from opentelemetry import trace
from infra.logging import configure_logging
from infra.telemetry.setup import configure_telemetry
import structlog
stream = io.StringIO()
configure_logging("INFO", "json", stream=stream)
configure_telemetry("compensa-test", environ={})
structlog.get_logger().info("outside")
with trace.get_tracer("t").start_as_current_span("s") as span:
    structlog.get_logger().info("inside")
    ids = (format(span.get_span_context().trace_id, "032x"), format(span.get_span_context().span_id, "016x"))
outside, inside = [json.loads(line) for line in stream.getvalue().splitlines() if '"outside"' in line or '"inside"' in line]
print(json.dumps([("trace_id" in outside), inside["trace_id"], inside["span_id"], list(ids)]))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    outside_has_trace, trace_id, span_id, ids = json.loads(result.stdout.strip().splitlines()[-1])
    # No exporter configured: the span is not recorded, but it has ids and the log line has them.
    assert outside_has_trace is False
    assert [trace_id, span_id] == ids and int(trace_id, 16) != 0


# ---------------------------------------------------------------- the catalogue


def test_catalogue_names_are_what_prometheus_scrapes() -> None:
    reader = PrometheusMetricReader()  # registers with prometheus_client's default registry
    provider = MeterProvider(metric_readers=[reader])
    meter = provider.get_meter("compensa")
    for spec in CATALOGUE:
        attributes = dict.fromkeys(spec.labels, "x")
        if spec.kind == "counter":
            meter.create_counter(spec.name, unit=spec.unit).add(1, attributes)
        elif spec.kind == "histogram":
            meter.create_histogram(spec.name, unit=spec.unit).record(1.0, attributes)
        else:
            meter.create_gauge(spec.name, unit=spec.unit).set(1, attributes)
    exposition = generate_latest(REGISTRY).decode()
    provider.shutdown()
    for spec in CATALOGUE:
        suffix = "_count" if spec.kind == "histogram" else ""
        line = next((ln for ln in exposition.splitlines() if ln.startswith(spec.prometheus_name + suffix + "{")), None)
        assert line is not None, f"{spec.name} is not scraped as {spec.prometheus_name}"
        for label in spec.labels:
            assert f'{label}="x"' in line


def test_catalogue_is_documented_in_full() -> None:
    doc = (ROOT / "docs" / "metrics.md").read_text()
    for spec in CATALOGUE:
        assert f"`{spec.prometheus_name}`" in doc, spec.name
        for label in spec.labels:
            assert label in doc


def test_label_values_of_reason_classes_are_a_closed_set() -> None:
    assert reason_class_label("transient") == "transient"
    assert reason_class_label("x" * 64) == "other"
    assert "other" not in REASON_CLASSES


# ---------------------------------------------------------------- saga metrics

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def state(status: SagaStatus, step: int, at: float) -> SagaState:
    return SagaState(
        saga_id="o-1",
        definition="order",
        status=status,
        step=step,
        data={},
        done_steps=(),
        pending_compensations=(),
        compensation_attempts=0,
        reason=None,
        version=1,
        started_at=T0,
        updated_at=T0 + timedelta(seconds=at),
    )


@pytest.mark.parametrize(
    ("before", "after", "trigger", "outcome"),
    [
        (None, state(SagaStatus.RUNNING, 0, 0), "order.created", None),
        (state(SagaStatus.RUNNING, 0, 0), state(SagaStatus.RUNNING, 1, 1), "stock.reserved", "succeeded"),
        (state(SagaStatus.RUNNING, 1, 1), state(SagaStatus.COMPENSATING, 1, 2), "payment.declined", "failed"),
        (state(SagaStatus.RUNNING, 0, 0), state(SagaStatus.REJECTED, 0, 1), "stock.reservation_failed", "failed"),
        (state(SagaStatus.RUNNING, 1, 1), state(SagaStatus.COMPENSATING, 1, 9), "deadline:step:charge", "timed_out"),
        (state(SagaStatus.RUNNING, 2, 1), state(SagaStatus.COMPLETED, 2, 2), "stock.committed", "succeeded"),
        (state(SagaStatus.COMPENSATING, 1, 2), state(SagaStatus.CANCELLED, 1, 3), "stock.released", None),
        (state(SagaStatus.RUNNING, 1, 1), replace(state(SagaStatus.RUNNING, 1, 1), version=2), "stock.reserved", None),
    ],
)
def test_how_a_transition_ends_the_step_in_progress(
    before: SagaState | None, after: SagaState, trigger: str, outcome: str | None
) -> None:
    assert step_outcome(AppliedTransition(ORDER_SAGA, before, after, trigger)) == outcome
