"""The harness's Prometheus really scrapes: targets the test sets, queries, a target going down.

The ``/metrics`` endpoints are prometheus_client's own HTTP server on a free port, serving
a registry of the test's, so nothing here depends on compensa's instruments. A machine
without the ``prometheus`` package gets it installed; if that fails the tests fail.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from tests.harness.servers import HarnessError, LocalPrometheus, local_prometheus
from tests.harness.servers.process import wait_for

pytestmark = pytest.mark.integration

MONITORING = Path(__file__).resolve().parents[2] / "infra" / "monitoring"
ALERTS = MONITORING / "alerts.yml"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "compensa.json"


@contextmanager
def metrics_endpoint(registry: CollectorRegistry) -> Iterator[str]:
    """Serve ``registry`` at ``http://127.0.0.1:<free port>/metrics``; yield ``host:port``."""
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def prometheus() -> Iterator[LocalPrometheus]:
    """One Prometheus for the module, scraping every 200 ms; each test sets its targets."""
    with local_prometheus(scrape_interval=0.2) as server:
        yield server


def test_a_served_counter_is_scraped_and_queried_back(prometheus: LocalPrometheus) -> None:
    registry = CollectorRegistry()
    started = Counter("compensa_sagas_started", "Sagas started.", ["saga_type"], registry=registry)
    duration = Histogram("compensa_saga_duration_seconds", "Saga time.", ["saga_type", "status"], registry=registry)
    started.labels("order").inc(3)
    duration.labels("order", "completed").observe(0.3)
    with metrics_endpoint(registry) as address:
        prometheus.set_targets([(address, {"job": "saga"})])
        target = prometheus.wait_until_up(address)
        assert target["labels"]["job"] == "saga"
        assert target["scrapeUrl"] == f"http://{address}/metrics"

        [sample] = prometheus.wait_for_query('compensa_sagas_started_total{saga_type="order"}')
        assert sample["metric"]["job"] == "saga" and sample["metric"]["instance"] == address
        assert float(sample["value"][1]) == 3

        started.labels("order").inc(2)  # scraped again: the new value arrives
        prometheus.wait_for_query(
            'compensa_sagas_started_total{saga_type="order"}', until=lambda s: bool(s) and float(s[0]["value"][1]) == 5
        )
        assert prometheus.value('sum(compensa_saga_duration_seconds_count{status="completed"})') == 1
        # histogram_quantile over the buckets, as the dashboard does it.
        p50 = prometheus.value("histogram_quantile(0.5, sum by (le) (compensa_saga_duration_seconds_bucket))")
        assert p50 is not None and 0.25 <= p50 <= 0.5


def test_targets_are_rewritten_and_a_stopped_one_goes_down(prometheus: LocalPrometheus) -> None:
    registry = CollectorRegistry()
    Gauge("compensa_outbox_pending", "Pending rows.", ["service"], registry=registry).labels("stock").set(7)
    with metrics_endpoint(registry) as first, metrics_endpoint(registry) as second:
        prometheus.set_targets([(first, {"job": "relay"})])
        prometheus.wait_until_up(first)
        prometheus.set_targets([(first, {"job": "relay"}), (second, {"job": "relay"})])  # a second replica
        prometheus.wait_until_up(second)
        prometheus.wait_for_query('up{job="relay"} == 1', until=lambda s: len(s) == 2)
        assert prometheus.value('sum(compensa_outbox_pending{service="stock"})') in (7, 14)
        prometheus.set_targets([(first, {"job": "relay"})])
        prometheus.wait_for_query('up{job="relay"}', until=lambda s: [x["metric"]["instance"] for x in s] == [first])
    # The endpoint is gone: the next scrape fails and `up` says so (what the ProcessDown alert reads).
    prometheus.wait_for_query(f'up{{instance="{first}"}} == 0')
    assert prometheus.target(first)["health"] == "down"


def test_a_malformed_query_raises_with_prometheus_message(prometheus: LocalPrometheus) -> None:
    with pytest.raises(HarnessError, match="bad_data"):
        prometheus.query("sum(")


def test_every_dashboard_query_parses_in_prometheus(prometheus: LocalPrometheus) -> None:
    """Grafana sends these as they are, with its variables filled in: Prometheus must accept each."""
    board = json.loads(DASHBOARD.read_text())
    variables = {"$__rate_interval": "1m", "$saga_type": ".*", "$queue": ".*"}
    exprs = [target["expr"] for panel in board["panels"] for target in panel.get("targets", [])]
    assert exprs
    for expr in exprs:
        for name, value in variables.items():
            expr = expr.replace(name, value)
        assert "$" not in expr, f"unfilled variable in {expr}"
        prometheus.query(expr)  # a parse error raises HarnessError with Prometheus' message


def test_the_alert_rules_load_and_evaluate_on_a_real_server() -> None:
    """alerts.yml as compose loads it: new dead letters and an open circuit go pending at once."""
    registry = CollectorRegistry()
    Gauge("compensa_dead_letters_new", "New dead letters.", ["queue"], registry=registry).labels("stock.commands").set(2)
    Gauge("compensa_circuit_state", "Circuit state.", ["circuit"], registry=registry).labels("payment_gateway").set(2)
    with (
        metrics_endpoint(registry) as address,
        local_prometheus([(address, {"job": "dlq"})], scrape_interval=0.2, rule_files=[ALERTS]) as prometheus,
    ):
        prometheus.wait_until_up(address)
        groups = prometheus.rules()
        assert groups and all(rule["health"] != "err" for group in groups for rule in group["rules"])

        def active(names: set[str]) -> bool:
            return names <= {alert["labels"]["alertname"] for alert in prometheus.alerts()}

        wait_for(lambda: active({"DeadLettersNew", "CircuitOpen"}), what="DeadLettersNew and CircuitOpen pending", timeout=30)
        [dead] = [alert for alert in prometheus.alerts() if alert["labels"]["alertname"] == "DeadLettersNew"]
        assert dead["labels"]["queue"] == "stock.commands" and dead["labels"]["severity"] == "warning"
        assert "stock.commands" in dead["annotations"]["summary"]
