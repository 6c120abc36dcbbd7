"""Operator tooling without servers: merge patches, parsing, dead-letter rows, replay decisions,
and the CLI's error paths (one line on stderr, exit 1, never a traceback) over SQLite."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner

from contracts import ReserveStock, StockLine, encode, new_message
from infra import topology as t
from infra.cli import CliError, app
from infra.cli_ops import parse_duration, parse_ids, parse_time
from infra.dlq.archive import dead_letter_row
from infra.dlq.replay import merge_patch, prepare
from infra.dlq.tables import UNDECODABLE
from infra.settings import get_settings
from infra.transport.memory import MemoryDelivery, StoredMessage

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
QUEUES = {q.name: q for q in t.WORK_QUEUES}

# ---------------------------------------------------------------- RFC 7396


@pytest.mark.parametrize(
    ("target", "patch", "result"),
    [  # The examples of RFC 7396, appendix A.
        ({"a": "b"}, {"a": "c"}, {"a": "c"}),
        ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
        ({"a": "b"}, {"a": None}, {}),
        ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
        ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
        ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
        ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
        ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
        (["a", "b"], ["c", "d"], ["c", "d"]),
        ({"a": "b"}, ["c"], ["c"]),
        ({"a": "foo"}, None, None),
        ({"a": "foo"}, "bar", "bar"),
        ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
        ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
        ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
    ],
)
def test_merge_patch_follows_rfc_7396(target: Any, patch: Any, result: Any) -> None:
    assert merge_patch(target, patch) == result


def test_merge_patch_leaves_its_target_alone() -> None:
    target = {"a": {"b": 1}}
    merge_patch(target, {"a": {"b": 2}})
    assert target == {"a": {"b": 1}}


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("10m", 600), ("2h", 7200), ("1d", 86400), ("1h30m", 5400), ("90", 90), ("1.5h", 5400), ("250ms", 0.25)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "10x", "m", "ten minutes", "-5m", "1h-"])
def test_bad_durations_say_how_to_write_one(text: str) -> None:
    with pytest.raises(CliError, match="--stuck-for: bad duration .* use e.g. 30s, 10m"):
        parse_duration(text, "--stuck-for")


def test_times_are_iso_or_a_duration_ago() -> None:
    assert parse_time("2026-01-31T10:00:00Z", "--since", NOW) == datetime(2026, 1, 31, 10, tzinfo=UTC)
    assert parse_time("2026-01-31T10:00", "--since", NOW) == datetime(2026, 1, 31, 10, tzinfo=UTC)
    assert parse_time("2026-01-31T11:00:00+01:00", "--since", NOW) == datetime(2026, 1, 31, 10, tzinfo=UTC)
    assert parse_time("2h", "--since", NOW) == NOW - timedelta(hours=2)
    with pytest.raises(CliError, match="--until: expected an ISO 8601 time"):
        parse_time("yesterday", "--until", NOW)


def test_ids_lists_and_ranges() -> None:
    assert parse_ids(["3", "1,2", "5-7", "2"]) == (3, 1, 2, 5, 6, 7)
    with pytest.raises(CliError, match="bad dead-letter id 'x1'"):
        parse_ids(["x1"])
    with pytest.raises(CliError, match="bad id range"):
        parse_ids(["9-3"])


# ---------------------------------------------------------------- dead-letter rows


def _reserve(order_id: str = "ord-1") -> Any:
    return new_message(ReserveStock(order_id=order_id, lines=(StockLine(sku="A", quantity=2),)), correlation_id=order_id, producer="test")


def _delivery(body: bytes, headers: dict[str, Any], message_id: str | None = "m-1", correlation_id: str | None = None) -> MemoryDelivery:
    dlq = t.DEAD_LETTER_QUEUES[1]
    assert dlq.name == "stock.commands.dlq"
    stored = StoredMessage(body, headers, message_id, t.DLX.name, "stock.commands", correlation_id)
    return MemoryDelivery(SimpleNamespace(unacked={}), dlq, stored)  # type: ignore[arg-type]


def _compensa_headers(**overrides: Any) -> dict[str, Any]:
    headers = {
        t.H_REASON_CLASS: "handler_error", t.H_REASON: "RuntimeError: boom", t.H_ATTEMPT: 3,
        t.H_ORIGINAL_EXCHANGE: "compensa.commands", t.H_ORIGINAL_ROUTING_KEY: "stock.reserve",
        t.H_ORIGINAL_QUEUE: "stock.commands", t.H_FIRST_FAILURE: "2026-03-01T11:00:00+00:00",
        t.H_LAST_FAILURE: "2026-03-01T11:30:00+00:00", t.H_SAGA_ID: "ord-1", "traceparent": b"00-abc",
    }
    headers.update(overrides)
    return headers


def test_a_dead_letter_row_keeps_everything_the_headers_say() -> None:
    message = _reserve()
    row = dead_letter_row(_delivery(encode(message.envelope), _compensa_headers(), str(message.message_id)), NOW)

    assert row["queue"] == "stock.commands" and row["dlq"] == "stock.commands.dlq"
    assert (row["type"], row["version"], row["message_id"], row["saga_id"]) == ("stock.reserve", 1, str(message.message_id), "ord-1")
    assert (row["reason_class"], row["reason"], row["attempts"]) == ("handler_error", "RuntimeError: boom", 3)
    assert (row["original_exchange"], row["original_routing_key"]) == ("compensa.commands", "stock.reserve")
    assert row["first_failure_at"] == datetime(2026, 3, 1, 11, tzinfo=UTC)
    assert row["last_failure_at"] == datetime(2026, 3, 1, 11, 30, tzinfo=UTC)
    assert json.loads(row["body"])["payload"]["order_id"] == "ord-1" and row["body_encoding"] == "utf-8"
    assert json.loads(row["headers"])["traceparent"] == "00-abc"
    assert row["status"] == "new" and row["archived_at"] == NOW


def test_an_undecodable_body_is_stored_too() -> None:
    body = b"\xff\xfe\x00 not json"
    row = dead_letter_row(_delivery(body, _compensa_headers(**{t.H_REASON_CLASS: "contract"}), None, "corr-9"), NOW)

    assert row["type"] == UNDECODABLE and row["version"] is None
    assert row["body_encoding"] == "base64" and base64.b64decode(row["body"]) == body
    assert row["message_id"] is None and row["saga_id"] == "ord-1"


def test_a_message_dead_lettered_by_rabbitmq_itself_is_described_from_x_death() -> None:
    death = {"reason": b"rejected", "queue": b"ledger.events", "exchange": b"compensa.events",
             "routing-keys": [b"payment.authorized"], "count": 2, "time": datetime(2026, 3, 1, 10, 0)}
    row = dead_letter_row(_delivery(b"{}", {"x-death": [death]}), NOW)

    assert (row["queue"], row["reason_class"]) == ("ledger.events", "broker_rejected")
    assert (row["original_exchange"], row["original_routing_key"], row["attempts"]) == ("compensa.events", "payment.authorized", 2)
    assert row["last_failure_at"] == datetime(2026, 3, 1, 10, tzinfo=UTC)
    assert row["type"] == UNDECODABLE  # {} is not an envelope


def test_the_same_dead_letter_redelivered_has_the_same_dedup_key_and_a_new_failure_another() -> None:
    message = _reserve()
    body = encode(message.envelope)
    first = dead_letter_row(_delivery(body, _compensa_headers()), NOW)
    again = dead_letter_row(_delivery(body, _compensa_headers()), NOW + timedelta(minutes=5))
    later = dead_letter_row(_delivery(body, _compensa_headers(**{t.H_LAST_FAILURE: "2026-03-01T12:00:00+00:00"})), NOW)

    assert first["dedup_key"] == again["dedup_key"]
    assert later["dedup_key"] != first["dedup_key"]


# ---------------------------------------------------------------- replay decisions


def _row(message: Any, queue: str = "stock.commands") -> Any:
    return SimpleNamespace(body=encode(message.envelope).decode(), body_encoding="utf-8", type=message.type, queue=queue)


def test_replay_keeps_the_message_id_and_validates_the_edited_payload() -> None:
    message = _reserve()
    prepared = prepare(_row(message), {"lines": [{"sku": "B", "quantity": 5}]}, QUEUES)

    assert not isinstance(prepared, str)
    assert prepared.message_id == message.message_id
    assert prepared.payload.lines == (StockLine(sku="B", quantity=5),)


def test_an_edit_that_breaks_the_contract_is_refused_with_the_validation_error() -> None:
    refused = prepare(_row(_reserve()), {"lines": [{"sku": "B", "quantity": -1}]}, QUEUES)

    assert isinstance(refused, str)
    assert "invalid payload for stock.reserve v1" in refused and "lines.0.quantity" in refused


def test_replay_refuses_a_queue_that_does_not_consume_the_type_and_an_unknown_queue() -> None:
    assert prepare(_row(_reserve(), "ledger.events"), None, QUEUES) == "queue ledger.events does not consume stock.reserve"
    assert "is not in the topology" in str(prepare(_row(_reserve(), "gone.queue"), None, QUEUES))


# ---------------------------------------------------------------- the CLI, over SQLite

runner = CliRunner()


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[dict[str, str]]:
    """COMPENSA_DATABASE_URL on a fresh SQLite file, no broker or redis; settings re-read."""
    import os

    for key in list(os.environ):
        if key.startswith("COMPENSA_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("COMPENSA_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'c.db'}")
    monkeypatch.setenv("COMPENSA_LOG_LEVEL", "WARNING")
    get_settings.cache_clear()
    yield {}
    get_settings.cache_clear()


def cli(*args: str, input: str | None = None) -> Any:
    get_settings.cache_clear()
    return runner.invoke(app, list(args), input=input)


def one_line_error(result: Any, *fragments: str) -> str:
    """Assert exit 1 with a single `error:` line on stderr naming every fragment."""
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture
def migrated(env: dict[str, str]) -> None:
    result = cli("db", "upgrade")
    assert result.exit_code == 0, result.stderr


def test_a_database_without_tables_says_run_db_upgrade(env: dict[str, str]) -> None:
    one_line_error(cli("dlq", "list"), "no compensa tables yet", "compensa db upgrade")


def test_an_unreachable_database_names_the_variable(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connection refused
        monkeypatch.setenv("COMPENSA_DATABASE_URL", f"postgresql+asyncpg://ops:s3cret@127.0.0.1:{port}/compensa")
        for args in (["dlq", "list"], ["dlq", "show", "1"], ["dlq", "replay", "--all"], ["saga", "retry", "x"]):
            line = one_line_error(cli(*args), "cannot reach the database", "COMPENSA_DATABASE_URL")
            assert "s3cret" not in line


def test_unknown_ids_bad_filters_and_bad_durations_are_one_line(migrated: None) -> None:
    one_line_error(cli("dlq", "show", "42"), "no dead letter 42", "compensa dlq list")
    one_line_error(cli("dlq", "show", "abc"), "bad dead-letter id 'abc'")
    one_line_error(cli("dlq", "replay", "7", "8"), "no dead letter 7, 8")
    one_line_error(cli("dlq", "purge", "7", "--yes"), "no dead letter 7")
    one_line_error(cli("dlq", "list", "--queue", "nope"), "--queue: unknown queue 'nope'", "stock.commands")
    one_line_error(cli("dlq", "list", "--type", "order.exploded"), "--type: unknown message type")
    one_line_error(cli("dlq", "list", "--status", "lost"), "--status: unknown status 'lost'", "new, replayed, purged")
    one_line_error(cli("dlq", "list", "--since", "last tuesday"), "--since: expected an ISO 8601 time")
    one_line_error(cli("dlq", "list", "--since", "1h", "--until", "2h"), "is after --until")
    one_line_error(cli("saga", "list", "--stuck-for", "10x"), "--stuck-for: bad duration '10x'")
    one_line_error(cli("saga", "list", "--older-than", "soon"), "--older-than: bad duration")
    one_line_error(cli("saga", "retry", "ord-404"), "no saga 'ord-404'", "--status compensation_failed")
    one_line_error(cli("dlq", "replay"), "name the dead letters")
    one_line_error(cli("dlq", "purge"), "name the dead letters")
    one_line_error(cli("dlq", "replay", "--all", "--edit", "{nope"), "--edit: not valid JSON")
    one_line_error(cli("dlq", "replay", "--all", "--edit", "[1]"), "--edit: a merge patch of the payload must be a JSON object")


def test_empty_archive_lists_nothing_in_json(migrated: None) -> None:
    result = cli("dlq", "list", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == {"total": 0, "dead_letters": []}
    grouped = cli("dlq", "list", "--group", "--json")
    assert json.loads(grouped.stdout) == []
    replay = cli("dlq", "replay", "--all", "--json")
    assert json.loads(replay.stdout) == {"dry_run": False, "replayed": 0, "skipped": 0, "refused": 0, "outcomes": []}


def test_health_without_servers_is_healthy_on_the_embedded_default(migrated: None) -> None:
    result = cli("health", "--json")
    assert result.exit_code == 0, result.stdout
    report = json.loads(result.stdout)
    assert report["ok"] and report["checks"]["broker"]["kind"] == "in-memory"
    assert report["checks"]["redis"] == {"ok": True, "configured": False, "latency_ms": report["checks"]["redis"]["latency_ms"]}


def test_health_before_migrations_is_unhealthy_and_says_how_to_fix_it(env: dict[str, str]) -> None:
    result = cli("health", "--json")
    assert result.exit_code == 1
    database = json.loads(result.stdout)["checks"]["database"]
    assert not database["ok"] and database["fix"] == "run `compensa db upgrade`"


def test_health_names_each_unreachable_server_and_its_variable(migrated: None, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        monkeypatch.setenv("COMPENSA_AMQP_URL", f"amqp://guest:hunter2@127.0.0.1:{port}/")
        monkeypatch.setenv("COMPENSA_REDIS_URL", f"redis://127.0.0.1:{port}/0")
        result = cli("health")
    assert result.exit_code == 1
    text = " ".join(result.stdout.split())
    assert "COMPENSA_AMQP_URL" in text and "COMPENSA_REDIS_URL" in text and "unhealthy" in text
    assert "hunter2" not in result.stdout + result.stderr and "Traceback" not in result.stdout + result.stderr


def test_purge_without_a_terminal_needs_yes(migrated: None) -> None:
    from infra.db import create_engine
    from infra.dlq.archive import DeadLetterArchive

    async def archive_one() -> None:
        engine = create_engine(get_settings().database_url)
        try:
            await DeadLetterArchive(engine, SimpleNamespace(now=lambda: NOW)).store(
                [dead_letter_row(_delivery(encode(_reserve().envelope), _compensa_headers(), str(uuid.uuid4())), NOW)]
            )
        finally:
            await engine.dispose()

    get_settings.cache_clear()
    asyncio.run(archive_one())
    one_line_error(cli("dlq", "purge", "--queue", "stock.commands"), "would purge 1 dead letters", "--yes")
    listed = json.loads(cli("dlq", "list", "--json").stdout)
    assert [d["status"] for d in listed["dead_letters"]] == ["new"]
    done = cli("dlq", "purge", "--queue", "stock.commands", "--yes", "--json")
    assert done.exit_code == 0 and json.loads(done.stdout)["purged"] == 1
