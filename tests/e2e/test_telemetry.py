"""Production telemetry, as separate OS processes export it: traces over OTLP, metrics to Prometheus.

`compensa api` and `compensa run` run as their own processes, configured only by the
standard OTEL_* variables and `--metrics-port`. A real OTLP/HTTP receiver (the official
protobuf messages) collects their spans; a real Prometheus scrapes their /metrics.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from consumers.stock import seed_stock
from infra.clock import SystemClock
from outbox.tables import tables_for
from producers.ingest.auth import ProducerStore, generate_key
from tests.e2e.support import Process, Stack, unique, wait_terminal
from tests.harness.servers import free_port
from tests.harness.servers.prometheus import LocalPrometheus, local_prometheus
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan, otlp_receiver
from tests.support import COMPENSA, eventually

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SERVER, CONSUMER, PRODUCER = 2, 5, 4  # OTLP Span.SpanKind values


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with otlp_receiver() as running:
        yield running


def spawn(args: list[str], env: dict[str, str], log: Path) -> Process:
    with log.open("wb") as out:
        popen = subprocess.Popen(args, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    return Process(popen, log)


def order_event(order_id: str, sku: str, token: str) -> dict[str, object]:
    payload = {
        "order_id": order_id,
        "customer_id": unique("cust"),
        "lines": [{"sku": sku, "quantity": 1, "unit_price": 700}],
        "total": {"amount": 700, "currency": "EUR"},
        "payment_token": token,
    }
    return {"type": "order.created", "correlation_id": order_id, "payload": payload}


async def ingest_trace_id(stack: Stack, message_id: str) -> str:
    """The trace id the API wrote into the accepted event's envelope."""
    outbox = tables_for("ingest").outbox
    async with stack.engine.connect() as connection:
        body = (await connection.execute(select(outbox.c.body).where(outbox.c.message_id == message_id))).scalar_one()
    return str(json.loads(body)["traceparent"].split("-")[1])


def hops(spans: list[ReceivedSpan]) -> set[str]:
    return {span.name for span in spans if span.kind == CONSUMER}


@pytest.fixture
def telemetry_processes(stack: Stack, receiver: OtlpReceiver, redis_url: str, tmp_path: Path) -> Iterator[dict[str, object]]:
    ports = {"api": free_port(), "api_metrics": free_port(), "run_metrics": free_port()}
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "200",  # export spans within 0.2 s, not the default 5
        "OTEL_METRIC_EXPORT_INTERVAL": "1000",
        "COMPENSA_METRICS_SAMPLE_SECONDS": "0.5",
        "COMPENSA_LOG_LEVEL": "INFO",
    }
    run = spawn(
        [COMPENSA, "run", "--metrics-port", str(ports["run_metrics"])],
        {**stack.env(), **otel},
        tmp_path / "run.log",
    )
    api = spawn(
        [COMPENSA, "api", "--host", "127.0.0.1", "--port", str(ports["api"]), "--metrics-port", str(ports["api_metrics"])],
        {**stack.env(), **otel, "COMPENSA_REDIS_URL": redis_url},
        tmp_path / "api.log",
    )
    try:
        yield {"ports": ports, "run": run, "api": api}
    finally:
        for process in (api, run):
            if process.popen.poll() is None:
                process.popen.terminate()
                try:
                    process.popen.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.popen.kill()
                    process.popen.wait(timeout=10)


async def test_orders_over_http_are_one_trace_each_across_processes_and_prometheus_counts_them(
    stack: Stack, receiver: OtlpReceiver, telemetry_processes: dict[str, object]
) -> None:
    ports: dict[str, int] = telemetry_processes["ports"]  # type: ignore[assignment]
    run: Process = telemetry_processes["run"]  # type: ignore[assignment]
    api: Process = telemetry_processes["api"]  # type: ignore[assignment]
    sku = unique("SKU")
    await seed_stock(stack.engine, {sku: 100})
    key, record = generate_key(unique("erp"), ("order.created",), rate_limit=None, now=SystemClock().now())
    await ProducerStore(stack.engine).add(record)

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports['api']}", timeout=10) as client:

        async def api_ready() -> bool:
            assert api.popen.poll() is None, f"compensa api exited:\n{api.tail()}"
            assert run.popen.poll() is None, f"compensa run exited:\n{run.tail()}"
            try:
                return (await client.get("/health")).status_code == 200
            except httpx.TransportError:
                return False

        await eventually(api_ready, timeout=60, interval=0.2, message="compensa api did not become ready")
        tokens = {unique("ord"): "tok_ok_visa", unique("ord"): "tok_ok_mc", unique("ord"): "tok_decline_card"}
        accepted = {}
        for order_id, token in tokens.items():
            answer = await client.post("/v1/events", json=order_event(order_id, sku, token), headers={"X-API-Key": key})
            assert answer.status_code == 202, answer.text
            accepted[order_id] = answer.json()["message_id"]

    statuses = await wait_terminal(stack.engine, tokens, timeout=60)
    assert sorted(statuses.values()) == ["cancelled", "completed", "completed"], run.tail()

    # --- traces: one per order, rooted at the API's request span, every hop linked to its parent
    for order_id, message_id in accepted.items():
        trace_id = await ingest_trace_id(stack, message_id)
        expected_hops = {
            "saga.starts process order.created",
            "stock.commands process stock.reserve",
            "saga.events process stock.reserved",
            "payments.commands process payment.charge",
        }

        def whole_trace(trace_id: str = trace_id, expected_hops: set[str] = expected_hops) -> list[ReceivedSpan]:
            spans = receiver.trace(trace_id)
            assert expected_hops <= hops(spans), f"hops so far: {sorted(hops(spans))}"
            # A parent ends after its children: its batch may still be on the way.
            ids = {span.span_id for span in spans}
            dangling = [span.name for span in spans if span.parent_span_id and span.parent_span_id not in ids]
            assert not dangling, f"spans whose parent is not in the trace: {dangling}"
            # Every message consumed was published, and its publish and its processing hang
            # under the same creation context (the span that wrote it to the outbox).
            sends = {
                span.attributes["messaging.message.id"]: span.parent_span_id
                for span in spans
                if span.kind == PRODUCER and span.name.startswith("send ")
            }
            consumed = {s.attributes["messaging.message.id"]: s.parent_span_id for s in spans if s.kind == CONSUMER}
            unsent = {m: parent for m, parent in consumed.items() if sends.get(m) != parent}
            assert not unsent, f"processed, but no send span under the same creation context: {unsent}"
            return spans

        spans = await eventually(whole_trace, timeout=30, interval=0.2, message=f"the trace of {order_id}")
        [root] = [span for span in spans if not span.parent_span_id]
        assert (root.service, root.name, root.kind) == ("compensa-api", "POST /v1/events", SERVER)
        assert root.attributes["http.response.status_code"] == 202
        assert {span.service for span in spans} == {"compensa-api", "compensa"}
        # Messages written inside a span carry it as their creation context: no create spans.
        assert not [span.name for span in spans if span.name.startswith("create ")]
        consumed = [span for span in spans if span.kind == CONSUMER]
        assert all(span.attributes["messaging.message.conversation_id"] == order_id for span in consumed)
        transitions = [span for span in spans if "saga.transition" in span.events]
        assert transitions, "saga transitions are span events"
        if tokens[order_id].startswith("tok_decline"):
            assert any("saga.compensation_started" in span.events for span in spans) or any(
                span.attributes.get("compensa.saga.status") == "cancelled" for span in spans
            )

    # --- logs: the run process's lines carry the trace of the saga they are about
    any_order, any_message = next(iter(accepted.items()))
    trace_id = await ingest_trace_id(stack, any_message)
    lines = [json.loads(line) for line in run.log.read_text().splitlines() if line.startswith("{")]
    about_order = [line for line in lines if line.get("saga_id") == any_order and "trace_id" in line]
    assert about_order and all(line["trace_id"] == trace_id for line in about_order)

    # --- metrics: OTLP got them too, and Prometheus scrapes both processes
    await eventually(
        lambda: "compensa.sagas.started" in receiver.metric_names.get("compensa", set()), message="metrics over OTLP"
    )
    run_target, api_target = f"127.0.0.1:{ports['run_metrics']}", f"127.0.0.1:{ports['api_metrics']}"
    with local_prometheus([run_target, api_target], scrape_interval=0.5) as prometheus:
        prometheus.wait_until_up(run_target)
        prometheus.wait_until_up(api_target)
        assert_counted(prometheus, 'sum(compensa_sagas_started_total{saga_type="order"})', 3)
        assert_counted(prometheus, 'sum(compensa_saga_outcomes_total{status="completed"})', 2)
        assert_counted(prometheus, 'sum(compensa_saga_outcomes_total{status="cancelled"})', 1)
        assert_counted(prometheus, 'sum(compensa_saga_duration_seconds_count{saga_type="order"})', 3)
        assert_counted(prometheus, 'sum(compensa_saga_compensation_duration_seconds_count{status="cancelled"})', 1)
        assert_counted(prometheus, 'sum(compensa_api_requests_total{route="/v1/events",status_code="202"})', 3)
        steps = prometheus.wait_for_query('compensa_saga_step_duration_seconds_count{step="charge"}')
        assert {s["metric"]["outcome"] for s in steps} == {"succeeded", "failed"}
        processed = prometheus.value('sum(compensa_consumer_messages_total{queue="payments.commands",outcome="processed"})')
        assert processed == 3
        published = prometheus.wait_for_query("sum by (path) (compensa_outbox_published_total)")
        assert sum(float(s["value"][1]) for s in published) >= 3 * 5
        prometheus.wait_for_query('compensa_outbox_pending{service="ingest"} == 0')
        active = prometheus.wait_for_query('compensa_sagas_active{status="running"}')
        assert float(active[0]["value"][1]) == 0
        assert_counted(prometheus, 'sum(compensa_payment_gateway_calls_total{operation="authorize",outcome="succeeded"})', 2)
        assert_counted(prometheus, 'sum(compensa_payment_gateway_calls_total{operation="authorize",outcome="declined"})', 1)
        assert_counted(prometheus, 'sum(compensa_payment_gateway_duration_seconds_count{operation="authorize"})', 3)
        assert_counted(prometheus, 'compensa_circuit_state{circuit="payment_gateway"}', 0)


def assert_counted(prometheus: LocalPrometheus, promql: str, expected: float) -> None:
    samples = prometheus.wait_for_query(promql, until=lambda s: bool(s) and float(s[0]["value"][1]) == expected, timeout=30)
    assert float(samples[0]["value"][1]) == expected
