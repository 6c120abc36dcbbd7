"""compose.yaml, the Dockerfile and .dockerignore, checked without running Docker.

- compose.yaml is valid against the Compose Specification's JSON Schema (the one Docker's
  Compose release ships, tests/harness/compose_schema.py), and ``docker compose config``
  accepts it where Docker Compose is installed (the one test that skips, and only then);
- every compensa service runs the one image ``compensa:local``, built by one service only;
- PostgreSQL, RabbitMQ, Prometheus and Grafana keep their data in named volumes, and the
  services start in order behind health checks;
- the image is multi-stage, installs no dev extras, runs as a non-root user and has a
  HEALTHCHECK; .dockerignore keeps the venv, caches, tests and .git out of the context.

Nothing here was run against a Docker daemon: none answers on the machines these tests
were written on (README, "Running the real stack").
"""

from __future__ import annotations

import fnmatch
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.harness import compose_schema

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
IMAGE = "compensa:local"
COMPENSA_SERVICES = {"migrate", "saga", "stock", "payments", "ledger", "orders", "dlq", "health", "relay", "api", "cli"}


def _compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text()))


def test_compose_is_valid_against_the_compose_spec_schema() -> None:
    schema = compose_schema.schema()
    validator = jsonschema.Draft201909Validator(schema)  # its $schema: draft 2019-09
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(_compose())]
    assert errors == []
    # The schema does refuse what Compose refuses.
    broken = _compose()
    broken["services"]["saga"]["restart_policy"] = "always"
    broken["services"]["stock"]["depends_on"] = {"migrate": {"condition": "service_done"}}
    assert len(list(validator.iter_errors(broken))) >= 2


def _docker_compose() -> list[str] | None:
    docker = shutil.which("docker")
    if docker is None:
        return None
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=60, check=False)
    return [docker, "compose"] if probe.returncode == 0 else None


def test_docker_compose_config_accepts_the_file() -> None:
    command = _docker_compose()
    if command is None:
        pytest.skip("Docker Compose is not installed here (no `docker`, or `docker compose` is not a command)")
    result = subprocess.run(
        [*command, "-f", str(COMPOSE), "--profile", "tools", "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr


def test_every_compensa_service_runs_one_image_built_once() -> None:
    services = _compose()["services"]
    compensa = {name for name, service in services.items() if service.get("image") == IMAGE}
    assert compensa == COMPENSA_SERVICES
    builders = [name for name, service in services.items() if "build" in service]
    assert builders == ["migrate"], f"only one service may build the image, not {builders}"
    assert services["migrate"]["build"]["context"] == "."
    for name in compensa - {"migrate"}:
        assert services[name]["pull_policy"] == "never", f"{name} would try to pull {IMAGE} from a registry"
        needs = services[name]["depends_on"]
        # Whatever else it waits for, it waits for migrate: the image exists by then.
        assert needs["migrate"]["condition"] == "service_completed_successfully", name
    assert {name for name, service in services.items() if "image" not in service} == set()


def test_stateful_services_keep_their_data_in_named_volumes() -> None:
    compose = _compose()
    declared = set(compose["volumes"])
    for service, path in [
        ("postgres", "/var/lib/postgresql/data"),
        ("rabbitmq", "/var/lib/rabbitmq"),
        ("prometheus", "/prometheus"),
        ("grafana", "/var/lib/grafana"),
    ]:
        [volume] = [v for v in compose["services"][service]["volumes"] if str(v).endswith(":" + path)]
        assert volume.split(":")[0] in declared, service


def test_services_start_in_order_behind_health_checks() -> None:
    services = _compose()["services"]
    for name in ("postgres", "rabbitmq", "redis", "api", "health", "prometheus"):
        assert services[name]["healthcheck"]["test"], name
    migrate_needs = services["migrate"]["depends_on"]
    assert migrate_needs == {"postgres": {"condition": "service_healthy"}, "rabbitmq": {"condition": "service_healthy"}}
    assert services["api"]["depends_on"]["redis"] == {"condition": "service_healthy"}
    assert services["grafana"]["depends_on"]["prometheus"] == {"condition": "service_healthy"}


def _stages(dockerfile: str) -> list[list[str]]:
    """The Dockerfile's instructions (continuations joined), grouped by FROM."""
    lines = dockerfile.replace("\\\n", " ").splitlines()
    stages: list[list[str]] = []
    for line in (line.strip() for line in lines):
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        stages[-1].append(line)
    return stages


def test_the_image_is_multi_stage_non_root_without_dev_extras() -> None:
    stages = _stages(DOCKERFILE.read_text())
    assert len(stages) >= 2
    runtime = stages[-1]
    assert runtime[0].split()[-1] == _compose()["services"]["migrate"]["build"]["target"] == "runtime"
    users = [line.split()[1] for line in runtime if line.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "the runtime stage must end as a non-root user"
    assert any(line.upper().startswith("HEALTHCHECK ") for line in runtime)
    assert any(line.startswith("COPY --from=build ") for line in runtime)
    installs = [line for stage in stages for line in stage if "pip install" in line]
    assert installs and not [line for line in installs if "[dev" in line or "-e " in line]
    assert not [line for line in runtime if line.upper().startswith("COPY ") and "--from=" not in line], (
        "the runtime stage takes only the built virtualenv, no sources"
    )


def _ignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(
            fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(prefix, pattern.removeprefix("**/")) for prefix in prefixes
        ) or (pattern.startswith("**/") and any(fnmatch.fnmatch(part, pattern[3:]) for part in parts)):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_local_state_out_and_what_the_build_copies_in() -> None:
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    for path in (".venv", ".venv/bin/python", ".git", ".cache/asyncapi-parser", "tests/unit", "infra/__pycache__/x.pyc", ".env"):
        assert _ignored(path, patterns), f"{path} would be sent to the Docker daemon"
    sources = [
        source
        for stage in _stages(DOCKERFILE.read_text())
        for line in stage
        if line.startswith("COPY ") and "--from=" not in line
        for source in line.split()[1:-1]
    ]
    assert "pyproject.toml" in sources and "infra" in sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not _ignored(source, patterns), f"the Dockerfile copies {source}, which .dockerignore leaves out"
