"""`compensa broker definitions|grant` without a broker: passwords from the environment, never written in clear."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from infra.broker_access import compensa_grants
from infra.cli.broker import password_variable
from infra.cli.main import app
from infra.settings import get_settings

USERS = [g.user for g in compensa_grants()]


@pytest.fixture
def passwords(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A password variable for every compensa user, and no other COMPENSA_ setting."""
    for key in list(os.environ):
        if key.startswith("COMPENSA_"):
            monkeypatch.delenv(key)
    chosen = {user: f"pw-{user}-s3cret" for user in USERS}
    for user, password in chosen.items():
        monkeypatch.setenv(password_variable(user), password)
    get_settings.cache_clear()
    return chosen


def run(*args: str) -> Any:
    get_settings.cache_clear()
    return CliRunner().invoke(app, ["broker", *args])


def error_line(result: Any) -> str:
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stdout + result.stderr, result.stderr
    return lines[0]


def test_password_variables_name_the_role() -> None:
    assert password_variable("compensa-relay") == "COMPENSA_BROKER_PASSWORD_RELAY"
    assert password_variable("compensa-saga") == "COMPENSA_BROKER_PASSWORD_SAGA"
    assert password_variable("erp-eu.1", "X_") == "X_ERP_EU_1"


def test_definitions_hold_every_user_with_a_hashed_password_only(
    passwords: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    passwords["erp"] = "pw-erp-s3cret"
    monkeypatch.setenv("COMPENSA_BROKER_PASSWORD_ERP", passwords["erp"])
    out = tmp_path / "definitions.json"
    result = run("definitions", "--out", str(out), "--upstream", "erp:order.created")
    assert result.exit_code == 0, result.stderr
    text = out.read_text()
    document = json.loads(text)
    assert {u["name"] for u in document["users"]} == {*USERS, "erp"}
    assert all(u["hashing_algorithm"] == "rabbit_password_hashing_sha256" and u["password_hash"] for u in document["users"])
    assert not [password for password in passwords.values() if password in text]
    assert "s3cret" not in text and "pw-" not in text
    assert document["vhosts"] == [{"name": "/"}]
    assert {p["vhost"] for p in document["permissions"]} == {"/"}
    erp = [p for p in document["topic_permissions"] if p["user"] == "erp"]
    assert erp == [{"user": "erp", "vhost": "/", "exchange": "compensa.events", "write": "^(order\\.created)$", "read": ".*"}]
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_a_missing_password_variable_is_one_line_naming_it(
    passwords: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("COMPENSA_BROKER_PASSWORD_RELAY")
    out = tmp_path / "definitions.json"
    line = error_line(run("definitions", "--out", str(out)))
    assert "COMPENSA_BROKER_PASSWORD_RELAY (compensa-relay)" in line and "SAGA" not in line
    assert not out.exists()
    line = error_line(run("grant", "--management-url", "http://admin:admin@127.0.0.1:1/"))
    assert "COMPENSA_BROKER_PASSWORD_RELAY" in line
    line = error_line(run("definitions", "--out", str(out), "--upstream", "erp:order.created"))
    assert "COMPENSA_BROKER_PASSWORD_ERP (erp)" in line


def test_bad_upstreams_and_unreachable_apis_are_one_line(passwords: dict[str, str], tmp_path: Path) -> None:
    out = str(tmp_path / "d.json")
    assert "expected NAME:TYPE" in error_line(run("definitions", "--out", out, "--upstream", "erp"))
    assert "'payment.charge' is not an event type" in error_line(
        run("definitions", "--out", out, "--upstream", "erp:payment.charge")
    )
    assert "clashes" in error_line(run("definitions", "--out", out, "--upstream", "relay:order.created"))
    assert "no management API" in error_line(run("grant"))
    refused = error_line(run("grant", "--management-url", "http://admin:hidden-pw@127.0.0.1:1/"))
    assert "did not answer" in refused and "hidden-pw" not in refused and "admin:***@127.0.0.1:1" in refused
