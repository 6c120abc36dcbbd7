"""The monitoring configuration (infra/monitoring/, compose.yaml) checked by the ecosystem's own tools.

- ``promtool check config`` / ``check rules`` accept prometheus.yml and alerts.yml, and
  ``promtool test rules`` runs alerts.test.yml (each alert fires, and stays quiet when healthy);
- every metric the alerts and the dashboard query is in ``infra/telemetry/catalogue.py``
  (by its Prometheus name) or is an external one (``up``, RabbitMQ's ``rabbitmq_*``), with
  labels the catalogue gives it: a renamed metric or label fails here, not on a blank panel;
- compose.yaml gives every compensa process its telemetry variables, Prometheus scrapes
  every long-running one, and every file it mounts exists.

promtool comes with the Debian package ``prometheus``, installed by the harness when missing
(a machine where that fails fails these tests; it does not skip them). Docker is not needed:
nothing here runs compose.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.telemetry.catalogue import CATALOGUE, MetricSpec
from tests.harness.servers import promtool

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "infra" / "monitoring"
PROMETHEUS_YML = MONITORING / "prometheus.yml"
ALERTS_YML = MONITORING / "alerts.yml"
ALERTS_TEST_YML = MONITORING / "alerts.test.yml"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "compensa.json"
COMPOSE = ROOT / "compose.yaml"

#: Labels Prometheus attaches to every scraped series (`app`: prometheus.yml's relabelling).
TARGET_LABELS = frozenset({"job", "instance", "app"})
#: RabbitMQ's per-object queue metrics (rabbitmq_prometheus) are labelled by these.
RABBITMQ_LABELS = frozenset({"vhost", "queue"})
#: Scraped from RabbitMQ: their names belong to the plugin, not to the catalogue.
EXTERNAL_METRICS = re.compile(r"up|rabbitmq_[a-z0-9_]+")
METRICS_PORT = "9464"


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _catalogue_names() -> dict[str, MetricSpec]:
    """Every Prometheus series name of the catalogue: histograms by their _bucket/_sum/_count."""
    names: dict[str, MetricSpec] = {}
    for spec in CATALOGUE:
        if spec.kind == "histogram":
            names.update({spec.prometheus_name + suffix: spec for suffix in ("_bucket", "_sum", "_count")})
        else:
            names[spec.prometheus_name] = spec
    return names


# ------------------------------------------------------------------ PromQL, read just enough

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{([^{}]*)\}")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_IDENT = re.compile(r"(?<![\w:.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or", "unless"})
_KEYWORDS |= {"inf", "nan", "atan2"}


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (functions, keywords, labels, literals left out)."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("{}", text)
    text = _GROUPING.sub("()", text)
    text = _RANGE.sub("", text)
    return {name for name in _IDENT.findall(text) if name.lower() not in _KEYWORDS}


def label_names(expr: str) -> set[str]:
    """Every label an expression names: in matchers and in by/without/on/ignoring lists."""
    text = _STRING.sub('""', expr)
    labels: set[str] = set()
    for body in _MATCHERS.findall(text):
        labels |= {m.group(1) for m in re.finditer(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", body)}
    for body in _GROUPING.findall(text):
        labels |= {part.strip() for part in body.split(",") if part.strip()}
    return labels


def test_the_promql_reader_finds_names_and_labels() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le, queue) "
        '(rate(compensa_x_seconds_bucket{queue=~"a\\\\.dlq|$queue"}[$__rate_interval])))'
        ' > 0 unless on (app) count(up{job="compensa"} offset 10m) or vector(1)'
    )
    assert metric_names(expr) == {"compensa_x_seconds_bucket", "up"}
    assert label_names(expr) == {"le", "queue", "app", "job"}


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in _load(ALERTS_YML)["groups"] for rule in group["rules"] if "alert" in rule]


def dashboard_panels(panels: list[dict[str, Any]] | None = None) -> Iterator[dict[str, Any]]:
    for panel in json.loads(DASHBOARD.read_text())["panels"] if panels is None else panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def dashboard_expressions() -> list[str]:
    return [target["expr"] for panel in dashboard_panels() for target in panel.get("targets", [])]


def _queried() -> list[tuple[str, str]]:
    """(where, expression) for every alert and dashboard query."""
    return [(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()] + [
        ("dashboard", expr) for expr in dashboard_expressions()
    ]


# ------------------------------------------------------------------ promtool


def _promtool_ok(*args: str | Path) -> None:
    result = promtool(*args, cwd=ROOT)
    assert result.returncode == 0, f"promtool {' '.join(map(str, args))}:\n{result.stdout}{result.stderr}"


def test_prometheus_config_passes_promtool() -> None:
    _promtool_ok("check", "config", PROMETHEUS_YML.relative_to(ROOT))


def test_alert_rules_pass_promtool() -> None:
    _promtool_ok("check", "rules", ALERTS_YML.relative_to(ROOT))


def test_alert_rule_unit_tests_pass() -> None:
    _promtool_ok("test", "rules", ALERTS_TEST_YML.relative_to(ROOT))


def test_every_alert_is_unit_tested_firing_and_quiet() -> None:
    checks = [check for test in _load(ALERTS_TEST_YML)["tests"] for check in test["alert_rule_test"]]
    for rule in alert_rules():
        mine = [check for check in checks if check["alertname"] == rule["alert"]]
        assert any(check["exp_alerts"] for check in mine), f"{rule['alert']}: no test where it fires"
        assert any(not check["exp_alerts"] for check in mine), f"{rule['alert']}: no test where it stays quiet"


def test_every_alert_says_how_bad_and_what_happened() -> None:
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} >= {
        "SagaCompensationFailed",
        "DeadLettersNew",
        "RelayLagHigh",
        "CompensaProcessDown",
        "CircuitOpen",
    }
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"].strip() and rule["annotations"]["description"].strip(), rule["alert"]


def test_prometheus_loads_the_alert_rules() -> None:
    assert _load(PROMETHEUS_YML)["rule_files"] == [ALERTS_YML.name]


# ------------------------------------------------------------------ names and labels against the catalogue


@pytest.mark.parametrize(("where", "expr"), _queried())
def test_queried_metrics_and_labels_exist(where: str, expr: str) -> None:
    known = _catalogue_names()
    names = metric_names(expr)
    assert names, f"{where}: no metric found in {expr!r}"
    allowed = set(TARGET_LABELS)
    for name in names:
        if name in known:
            spec = known[name]
            allowed |= set(spec.labels) | ({"le"} if name.endswith("_bucket") else set())
        elif EXTERNAL_METRICS.fullmatch(name):
            allowed |= RABBITMQ_LABELS if name.startswith("rabbitmq_") else set()
        else:
            pytest.fail(f"{where}: {name!r} is neither in infra/telemetry/catalogue.py nor a known external metric ({expr})")
    unknown = label_names(expr) - allowed
    assert not unknown, f"{where}: labels {sorted(unknown)} are not the catalogue's for {sorted(names)} ({expr})"


def test_the_dashboard_shows_every_catalogued_metric() -> None:
    shown = {name for expr in dashboard_expressions() for name in metric_names(expr)}
    known = _catalogue_names()
    missing = {spec.prometheus_name for spec in CATALOGUE} - {known[name].prometheus_name for name in shown if name in known}
    assert not missing, f"no dashboard panel for {sorted(missing)}"


def test_the_dashboard_queries_through_its_datasource_variable() -> None:
    board = json.loads(DASHBOARD.read_text())
    variables = {var["name"]: var for var in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = [panel for panel in dashboard_panels() if panel["type"] != "row"]
    assert panels
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    ids = [panel["id"] for panel in dashboard_panels()]
    assert len(ids) == len(set(ids)), "panel ids repeat"


# ------------------------------------------------------------------ compose.yaml


def _compose() -> dict[str, Any]:
    return _load(COMPOSE)


def _compensa_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run this repository's image (one image, built by one of them)."""
    return {name: service for name, service in compose["services"].items() if service.get("image") == "compensa:local"}


def _long_running(services: dict[str, dict[str, Any]]) -> set[str]:
    return {name for name, service in services.items() if service.get("restart") != "no"}


def test_compose_gives_every_compensa_process_its_telemetry() -> None:
    services = _compensa_services(_compose())
    assert {"saga", "stock", "payments", "ledger", "orders", "dlq", "relay", "api", "health"} <= _long_running(services)
    names = []
    for name, service in services.items():
        env = service.get("environment") or {}
        assert env.get("OTEL_EXPORTER_OTLP_ENDPOINT") == "http://otel-collector:4318", name
        assert env.get("OTEL_EXPORTER_OTLP_PROTOCOL") == "http/protobuf", name
        assert env.get("OTEL_SERVICE_NAME", "").startswith("compensa-"), name
        names.append(env["OTEL_SERVICE_NAME"])
        if name in _long_running(services):
            assert env.get("COMPENSA_METRICS_PORT") == METRICS_PORT, f"{name} serves no /metrics"
    assert len(names) == len(set(names)), f"two services share an OTEL_SERVICE_NAME: {names}"


def test_prometheus_scrapes_every_long_running_compensa_service() -> None:
    compose = _compose()
    jobs = {job["job_name"]: job for job in _load(PROMETHEUS_YML)["scrape_configs"]}
    [discovery] = jobs["compensa"]["dns_sd_configs"]
    assert discovery["port"] == int(METRICS_PORT)
    assert set(discovery["names"]) == _long_running(_compensa_services(compose))
    # The relay runs replicas: DNS discovery (type A: one record per replica) scrapes each.
    assert discovery["type"] == "A" and compose["services"]["relay"]["deploy"]["replicas"] > 1
    rabbitmq_targets = {target for job in jobs.values() for group in job.get("static_configs", []) for target in group["targets"]}
    assert "rabbitmq:15692" in rabbitmq_targets
    assert jobs["rabbitmq-queues"]["metrics_path"] == "/metrics/detailed"
    assert "queue_coarse_metrics" in jobs["rabbitmq-queues"]["params"]["family"]


def test_compose_monitoring_services_and_their_ports() -> None:
    services = _compose()["services"]
    assert {"otel-collector", "jaeger", "prometheus", "grafana"} <= set(services)
    published = {port.split(":")[0] for service in services.values() for port in service.get("ports", [])}
    assert {"3000", "9090", "16686"} <= published
    collector = _load(MONITORING / "otel-collector.yaml")
    assert collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    traces = collector["service"]["pipelines"]["traces"]
    assert [collector["exporters"][name]["endpoint"] for name in traces["exporters"]] == ["jaeger:4317"]


def test_every_file_compose_mounts_exists_and_named_volumes_are_declared() -> None:
    compose = _compose()
    declared = set(compose.get("volumes") or {})
    mounted = 0
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which is not in the repository"
                mounted += 1
            else:
                assert source in declared, f"{name} uses volume {source!r}, not declared under volumes:"
    assert mounted >= 5
    for service, path in [
        ("postgres", "/var/lib/postgresql/data"),
        ("rabbitmq", "/var/lib/rabbitmq"),
        ("prometheus", "/prometheus"),
    ]:
        assert any(str(volume).endswith(":" + path) for volume in compose["services"][service]["volumes"]), service


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus() -> None:
    provisioning = MONITORING / "grafana" / "provisioning"
    [source] = _load(provisioning / "datasources" / "datasources.yaml")["datasources"][:1]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    [provider] = _load(provisioning / "dashboards" / "compensa.yaml")["providers"]
    grafana_mounts = dict(volume.split(":")[:2] for volume in _compose()["services"]["grafana"]["volumes"])
    assert grafana_mounts["./infra/monitoring/grafana/dashboards"] == provider["options"]["path"]
