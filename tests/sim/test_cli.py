"""`compensa simulate` as a user runs it: the console script, its outputs and its errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from sagas.simulation.faults import FaultRates
from sagas.simulation.report import html_page, terminal_summary, to_document
from tests.sim.support import InboxSwitchedOff, ledger_trusting_the_inbox, simulate
from tests.support import COMPENSA


def compensa(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPENSA_")}
    env["COLUMNS"] = "200"
    return subprocess.run(
        [COMPENSA, "simulate", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120, check=False
    )


def plain(text: str) -> str:
    """The error text without rich's box drawing and line wrapping."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def test_json_report_on_stdout() -> None:
    run = compensa("-n", "20", "--json")

    assert run.returncode == 0, run.stderr
    document = json.loads(run.stdout)
    assert document["sagas"] == 20
    assert sum(document["outcomes"].values()) == 20
    assert set(document["outcomes"]) <= {"completed", "cancelled", "rejected"}
    assert document["invariants"] == {"ok": True, "violations": []}
    assert document["faults"]["duplicate"] > 0  # the default profile


def test_report_directory(tmp_path: Path) -> None:
    out = tmp_path / "report"
    run = compensa("-n", "20", "--seed", "3", "--faults", "chaos", "--report", str(out))

    assert run.returncode == 0, run.stderr
    assert "invariants:      all hold" in run.stdout
    assert str(out / "report.html") in plain(run.stdout)
    document = json.loads((out / "report.json").read_text())
    slowest = document["slowest_saga"]["saga_id"]
    assert slowest and document["slowest_saga"]["timeline"]
    page = (out / "report.html").read_text()
    assert page.startswith("<!doctype html>")
    assert page.count("<svg") >= 3  # outcomes, durations, faults vs. recovery, timeline
    assert f"Timeline of the slowest saga: {slowest}" in page


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--faults", "nonsense"], "unknown fault profile 'nonsense'; choose one of none, default, chaos"),
        (["--fault", "bogus=0.1"], "unknown fault(s) bogus; known:"),
        (["--fault", "duplicate=2"], "fault rate duplicate=2.0 must be between 0 and 1"),
        (["--fault", "duplicate"], "expected NAME=RATE, got 'duplicate'"),
        (["--fault", "duplicate=often"], "rate of 'duplicate' must be a number, got 'often'"),
        (["-n", "0"], "Invalid value for '--sagas' / '-n'"),
        (["--amqp-url", "amqp://guest:guest@localhost:1/"], "the real stack needs --database-url as well"),
    ],
    ids=["profile", "fault-name", "fault-rate", "fault-syntax", "fault-number", "sagas", "amqp-without-db"],
)
def test_bad_arguments_fail_precisely(args: list[str], message: str) -> None:
    run = compensa(*args)

    assert run.returncode == 2
    assert message in plain(run.stderr)
    assert run.stdout == ""


def test_violation_report_names_saga_invariant_and_history() -> None:
    result = simulate(
        sagas=30,
        faults=FaultRates(duplicate=0.3, lost_ack=0.2),
        unit_of_work=InboxSwitchedOff,
        handler_overrides=ledger_trusting_the_inbox(),
    )
    assert not result.ok

    document = to_document(result)
    summary = terminal_summary(document)
    violation = next(v for v in result.violations if v.invariant == "no effect applied twice")

    assert document["invariants"]["ok"] is False
    assert f"✗ no effect applied twice: saga {violation.saga_id}: ledger capture posted more than once" in summary
    assert f"history of {violation.saga_id}:" in summary
    assert "payment.authorized" in summary.split(f"history of {violation.saga_id}:")[1]
    assert document["violating_sagas"][violation.saga_id]
    assert "Violations:" in html_page(document, list(result.durations.values()))


def refused_port() -> int:
    """A local port nothing listens on (bound and closed again)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_database_that_is_down_is_one_line_without_the_password() -> None:
    url = f"postgresql+asyncpg://ops:s3cret@127.0.0.1:{refused_port()}/x"
    run = compensa("-n", "5", "--database-url", url)

    assert run.returncode == 1 and run.stdout == ""
    assert "Traceback" not in run.stderr and "s3cret" not in run.stderr
    assert run.stderr.startswith("error: cannot reach the database at postgresql+asyncpg://ops:***@127.0.0.1:")
    assert run.stderr.count("\n") == 1 and run.stderr.endswith("check --database-url and that the server runs\n")
    as_json = compensa("-n", "5", "--database-url", url, "--json")
    assert as_json.returncode == 1 and "Traceback" not in as_json.stderr
    error = json.loads(as_json.stdout)
    assert error["ok"] is False and error["error"].startswith("cannot reach the database at postgresql+asyncpg://ops:***@")


def test_a_database_url_that_is_no_database_url_is_refused_before_the_run() -> None:
    run = compensa("-n", "5", "--database-url", "mysql://ops:s3cret@db/x")

    assert run.returncode == 2 and "Traceback" not in run.stderr and "s3cret" not in run.stderr
    assert "Invalid value for --database-url: unsupported database 'mysql'" in plain(run.stderr)


def test_a_report_path_naming_a_file_is_refused_before_the_run(tmp_path: Path) -> None:
    taken = tmp_path / "report.txt"
    taken.write_text("mine")
    run = compensa("-n", "5", "--report", str(taken))

    assert run.returncode == 2 and run.stdout == "" and taken.read_text() == "mine"
    assert (
        run.stderr
        == f"error: --report: {taken} exists and is not a directory; give a directory for report.json and report.html\n"
    )
