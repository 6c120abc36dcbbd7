"""Operator tooling without servers: merge patches, parsing, dead-letter rows, replay decisions,
and the CLI's error paths (one line on stderr, exit 1, never a traceback) over SQLite."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from contracts import ReserveStock, StockLine, encode, new_message
from infra import topology as t
from infra.cli.common import CliError, parse_duration, parse_ids, parse_time
from infra.clock import VirtualClock
from infra.dlq.archive import dead_letter_row
from infra.dlq.replay import merge_patch, prepare
from infra.dlq.tables import UNDECODABLE
from infra.settings import get_settings
from infra.transport.memory import MemoryBroker, MemoryDelivery, StoredMessage
from tests.unit.support import NASTY_IDS, NOW, assert_rendered, cli, one_line_error, store_rows, table_cells

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
    with pytest.raises(CliError, match=r"--stuck-for: bad duration .* use e.g. 30s, 10m"):
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
    return new_message(
        ReserveStock(order_id=order_id, lines=(StockLine(sku="A", quantity=2),)), correlation_id=order_id, producer="test"
    )


def _delivery(
    body: bytes, headers: dict[str, Any], message_id: str | None = "m-1", correlation_id: str | None = None
) -> MemoryDelivery:
    dlq = t.DEAD_LETTER_QUEUES[1]
    assert dlq.name == "stock.commands.dlq"
    stored = StoredMessage(body, headers, message_id, t.DLX.name, "stock.commands", correlation_id)
    return MemoryDelivery(MemoryBroker(VirtualClock()), dlq, stored)


def _compensa_headers(**overrides: Any) -> dict[str, Any]:
    headers = {
        t.H_REASON_CLASS: "handler_error",
        t.H_REASON: "RuntimeError: boom",
        t.H_ATTEMPT: 3,
        t.H_ORIGINAL_EXCHANGE: "compensa.commands",
        t.H_ORIGINAL_ROUTING_KEY: "stock.reserve",
        t.H_ORIGINAL_QUEUE: "stock.commands",
        t.H_FIRST_FAILURE: "2026-03-01T11:00:00+00:00",
        t.H_LAST_FAILURE: "2026-03-01T11:30:00+00:00",
        t.H_SAGA_ID: "ord-1",
        "traceparent": b"00-abc",
    }
    headers.update(overrides)
    return headers


def test_a_dead_letter_row_keeps_everything_the_headers_say() -> None:
    message = _reserve()
    row = dead_letter_row(_delivery(encode(message.envelope), _compensa_headers(), str(message.message_id)), NOW)

    assert row["queue"] == "stock.commands" and row["dlq"] == "stock.commands.dlq"
    assert (row["type"], row["version"], row["message_id"], row["saga_id"]) == (
        "stock.reserve",
        1,
        str(message.message_id),
        "ord-1",
    )
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
    death = {
        "reason": b"rejected",
        "queue": b"ledger.events",
        "exchange": b"compensa.events",
        "routing-keys": [b"payment.authorized"],
        "count": 2,
        "time": datetime(2026, 3, 1, 10, 0),
    }
    row = dead_letter_row(_delivery(b"{}", {"x-death": [death]}), NOW)

    assert (row["queue"], row["reason_class"]) == ("ledger.events", "broker_rejected")
    assert (row["original_exchange"], row["original_routing_key"], row["attempts"]) == (
        "compensa.events",
        "payment.authorized",
        2,
    )
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


def test_health_shows_an_open_payment_breaker_as_degraded(migrated: None) -> None:
    """A payments process recorded its breaker open (infra/circuit_breakers.py): health says so, in one row."""
    from consumers.payments.breaker import PAYMENT_GATEWAY, BreakerState, Transition
    from infra.circuit_breakers import record
    from infra.db import create_engine

    async def opened() -> None:
        engine = create_engine(get_settings().database_url)
        now = datetime.now(UTC)
        opening = Transition(PAYMENT_GATEWAY, BreakerState.CLOSED, BreakerState.OPEN, "5 in a row: timeout", now, 5)
        try:
            async with engine.begin() as connection:
                await record(connection, "pay-host:7", opening, now)
        finally:
            await engine.dispose()

    asyncio.run(opened())
    result = cli("health")
    report = json.loads(cli("health", "--json").stdout)

    assert result.exit_code == 1
    text = " ".join(result.stdout.split())
    assert "circuit_breakers" in text and "payment_gateway circuit open in pay-host:7" in text
    assert text.endswith("degraded") and "unhealthy" not in text
    assert report["status"] == "degraded"
    assert [(c["holder"], c["state"], c["failures"]) for c in report["checks"]["circuit_breakers"]["circuits"]] == [
        ("pay-host:7", "open", 5)
    ]


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


# ---------------------------------------------------------------- stored data in a terminal
#
# The archive keeps whatever arrived and old rows predate the contracts' identifier rules:
# markup (`[/]`, `[bold red]x`) and escapes (`\x1b[31m`) in ids, types and reasons must
# print as text, at 80 columns, with every id whole.


def test_visible_escapes_control_and_invisible_characters_only() -> None:
    from infra.cli.common import visible

    assert visible("[/] [bold red]x ünï €") == "[/] [bold red]x ünï €"
    assert visible("\x1b[31mred\x1b[0m") == "\\x1b[31mred\\x1b[0m"
    assert visible("a\nb\tc\x00d\x7f\x9b\u202e\u2028") == "a\\nb\\tc\\x00d\\x7f\\x9b\\u202e\\u2028"
    assert visible(None) == "" and visible(12) == "12"


def test_dlq_list_and_show_print_stored_markup_and_escapes_as_text_at_80_columns(migrated: None, narrow: int) -> None:
    from infra.cli.common import visible

    ids = store_rows(letters=NASTY_IDS)

    listed = assert_rendered(cli("dlq", "list"), narrow)
    assert sorted(int(i) for i in table_cells(listed, "id")) == sorted(ids.values())  # the id column is there, whole
    assert sorted(table_cells(listed, "saga")) == sorted(visible(s) for s in NASTY_IDS)  # and every saga id
    grouped = assert_rendered(cli("dlq", "list", "--group", "--reason-class", "handler_error[bold]0"), narrow)
    assert "handler_error[bold]0" in grouped and "failure groups (reason_class=handler_error[bold]0)" in grouped
    for saga_id, dead_letter_id in ids.items():
        shown = assert_rendered(cli("dlq", "show", str(dead_letter_id)))
        assert f"dead letter {dead_letter_id}" in shown and visible(saga_id) in shown
        assert "RuntimeError: [/] disk [bold red]full\\x1b[31m" in shown and "x-[/]" in shown and "v[bold]\\x1b[31m" in shown
        assert '"note": "[/]\\u009b"' in shown  # the payload stays valid JSON, its escapes JSON escapes
        assert json.loads(cli("dlq", "show", str(dead_letter_id), "--json").stdout)["dead_letter"]["saga_id"] == saga_id


def test_dlq_list_keeps_ids_whole_and_hides_optional_columns_when_narrow(
    migrated: None,
    narrow: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import infra.cli.common

    long_id = "ord-" + "0123456789" * 6  # 64 characters, the longest saga id
    ids = store_rows(letters=("ord-1", long_id))

    listed = assert_rendered(cli("dlq", "list"), narrow)
    assert sorted(int(i) for i in table_cells(listed, "id")) == sorted(ids.values())
    assert sorted(table_cells(listed, "saga")) == sorted(["ord-1", long_id])  # each on its row, unbroken
    assert "not shown at 80 columns: att, status, failed (UTC), queue, type, reason class (--json shows all)" in listed
    monkeypatch.setattr(infra.cli.common.unwrapped, "_width", 200)
    wide = assert_rendered(cli("dlq", "list"), 200)
    assert table_cells(wide, "queue") == ["stock.commands"] * 2 and "not shown" not in wide
    assert table_cells(wide, "type") == ["stock.reserve[/]\\x1b[31m1", "stock.reserve[/]\\x1b[31m0"]
    assert all(cell.startswith("RuntimeError: [/] disk") and cell.endswith("…") for cell in table_cells(wide, "reason"))


def test_one_line_table_folds_ids_only_when_they_alone_do_not_fit() -> None:
    from rich.console import Console

    from infra.cli.common import one_line_table

    saga_id = "s" * 64
    for width in (200, 80, 40):
        console = Console(width=width, record=True, file=open("/dev/null", "w"))  # noqa: SIM115 - closed with the console
        console.print(one_line_table(["id", "saga", "reason"], [[7, saga_id, "x" * 300]], width=width, keep=("id", "saga")))
        text = console.export_text()
        assert max(len(line) for line in text.splitlines()) <= width
        whole = "".join(line.split("│")[2].strip() for line in text.splitlines() if line.startswith("│"))
        assert whole == saga_id, (width, text)  # whole: on one line, or folded over several at 40 columns
        console.file.close()


# ---------------------------------------------------------------- strict edges: durations, times, ids, edits


@pytest.mark.parametrize("text", ["99999999999d", "1" * 400 + "s", "36526d", "5300w", "1" * 400])
def test_durations_beyond_100_years_are_refused(text: str) -> None:
    with pytest.raises(CliError, match=r"--older-than: duration .* is longer than 100 years"):
        parse_duration(text, "--older-than")


def test_times_out_of_range_or_ambiguous_are_refused_and_nothing_backtracks() -> None:
    import time

    with pytest.raises(CliError, match="--until: '0001-01-01T00:00:00\\+05:00' is out of range once converted to UTC"):
        parse_time("0001-01-01T00:00:00+05:00", "--until", NOW)
    with pytest.raises(CliError, match="has no unit"):
        parse_time("20260131", "--since", NOW)
    with pytest.raises(CliError, match="longer than 100 years"):
        parse_time("1" * 400 + "d", "--since", NOW)
    started = time.monotonic()
    with pytest.raises(CliError, match="expected an ISO 8601 time"):
        parse_time("1" * 5000 + "x", "--since", NOW)  # `(\d+(…)?)+` took 2 s at 24 digits, doubling with each
    assert time.monotonic() - started < 1


def test_id_ranges_are_bounded() -> None:
    assert len(parse_ids(["1-10000"])) == 10_000
    with pytest.raises(CliError, match=r"too many dead-letter ids .*at most 10,000"):
        parse_ids(["1-40000"])
    with pytest.raises(CliError, match="too many dead-letter ids"):
        parse_ids(["1-6000", "6001-12000"])
    with pytest.raises(CliError, match="ids are numbers from 0 to 9223372036854775807"):
        parse_ids(["99999999999999999999"])
    with pytest.raises(CliError, match="bad dead-letter id"):
        parse_ids(["١٢"])  # Arabic-Indic digits are digits to Python's \d, not to an id


def test_huge_durations_ids_and_deep_edits_are_one_line_errors(migrated: None, tmp_path: Path) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text('{"a":' * 10_000 + "1" + "}" * 10_000)
    big = tmp_path / "big.json"
    big.write_text('{"a": "' + "x" * (1 << 20) + '"}')
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"sku": "\xe9"}')

    one_line_error(
        cli("saga", "list", "--older-than", "99999999999d"), "--older-than: duration '99999999999d' is longer than 100 years"
    )
    one_line_error(cli("saga", "list", "--stuck-for", "9" * 400 + "h"), "--stuck-for: duration", "longer than 100 years")
    one_line_error(cli("dlq", "list", "--since", "4" * 400), "--since:", "has no unit")
    one_line_error(cli("dlq", "list", "--since", "4" * 400 + "s"), "--since: duration", "longer than 100 years")
    one_line_error(cli("dlq", "list", "--until", "9999-12-31T23:59:59-01:00"), "--until:", "out of range")
    one_line_error(cli("dlq", "prune", "--older-than", "99999999999d", "--yes"), "--older-than:", "longer than 100 years")
    one_line_error(cli("dlq", "replay", "1-40000"), "too many dead-letter ids (1-40000", "at most 10,000")
    one_line_error(cli("dlq", "purge", "1-40000", "--yes"), "too many dead-letter ids")
    one_line_error(cli("dlq", "show", "99999999999999999999"), "bad dead-letter id", "from 0 to 9223372036854775807")
    one_line_error(cli("dlq", "replay", "--all", "--edit", f"@{deep}"), "--edit: JSON nested 10,000 levels deep", "at most 32")
    one_line_error(cli("dlq", "replay", "--all", "--edit", "[" * 5000 + "]" * 5000), "--edit: JSON nested 5,000 levels deep")
    one_line_error(
        cli("dlq", "replay", "--all", "--edit", '{"a": ' + "7" * 5000 + "}"), "--edit: the integer", "does not fit in 64 bits"
    )
    one_line_error(cli("dlq", "replay", "--all", "--edit", '{"a": 1e999}'), "--edit: the number '1e999' is out of range")
    one_line_error(cli("dlq", "replay", "--all", "--edit", '{"a": NaN}'), "--edit: NaN is not JSON")
    one_line_error(cli("dlq", "replay", "--all", "--edit", '{"a": 1, "a": 2}'), "--edit: the key 'a' appears twice")
    one_line_error(cli("dlq", "replay", "--all", "--edit", f"@{big}"), "--edit:", "larger than 1,048,576 bytes")
    one_line_error(cli("dlq", "replay", "--all", "--edit", f"@{latin}"), "--edit:", "is not UTF-8")
    one_line_error(cli("dlq", "replay", "--all", "--edit", f"@{tmp_path}"), "--edit: cannot read")
    ok = cli("dlq", "replay", "--all", "--dry-run", "--edit", '{"lines": [{"sku": "B", "quantity": 5}], "a": {"b": [1, "[/]"]}}')
    assert ok.exit_code == 0, ok.stderr


def test_user_input_quoted_in_an_error_is_never_markup(migrated: None) -> None:
    one_line_error(cli("dlq", "list", "--queue", "[/]"), "--queue: unknown queue '[/]'")
    one_line_error(cli("dlq", "list", "--type", "[bold]\x1b[31m"), "--type: unknown message type '[bold]\\x1b[31m'")
    one_line_error(cli("dlq", "list", "--saga", "s" * 65), "--saga:", "longer than 64 characters")
    one_line_error(cli("saga", "retry", "[/]"), "no saga '[/]'")
    line = one_line_error(cli("dlq", "list", "--queue", "q" * 10_000), "--queue: unknown queue 'qqq")
    assert len(line) < 400


# ---------------------------------------------------------------- database errors: only a failed connection is "unreachable"


def test_database_errors_are_classified_precisely() -> None:
    import sqlite3

    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

    from infra.cli.common import explain_database_error, is_connection_failure

    class AsyncpgError(Exception):
        def __init__(self, message: str, sqlstate: str | None) -> None:
            super().__init__(message)
            self.sqlstate = sqlstate

    too_many = InterfaceError(
        "SELECT …",
        {},
        AsyncpgError(
            "<class 'asyncpg.exceptions._base.InterfaceError'>: the number of query arguments cannot exceed 32767", None
        ),
    )
    assert not is_connection_failure(too_many)
    assert explain_database_error(too_many, "postgresql+asyncpg://ops:***@db/compensa") == (
        "the database at postgresql+asyncpg://ops:***@db/compensa refused the query: "
        "InterfaceError: the number of query arguments cannot exceed 32767"
    )
    variables = OperationalError("SELECT …", {}, sqlite3.OperationalError("too many SQL variables"))
    assert explain_database_error(variables) == "the database refused the query: too many SQL variables"
    locked = OperationalError("UPDATE …", {}, sqlite3.OperationalError("database is locked"))
    assert not is_connection_failure(locked)
    assert is_connection_failure(OperationalError("connect", {}, sqlite3.OperationalError("unable to open database file")))
    for sqlstate in ("08006", "57P01", "53300", "28P01", "3D000"):
        assert is_connection_failure(DBAPIError("SELECT 1", {}, AsyncpgError("down", sqlstate)))
    for sqlstate in ("22003", "42703", "40001", "57014"):
        assert not is_connection_failure(DBAPIError("SELECT 1", {}, AsyncpgError("refused", sqlstate)))
    dropped = DBAPIError("SELECT 1", {}, AsyncpgError("connection is closed", None), connection_invalidated=True)
    assert "cannot reach the database" in explain_database_error(dropped)
    assert is_connection_failure(ConnectionRefusedError(111, "Connect call failed")) and not is_connection_failure(
        ValueError("x")
    )
    missing = OperationalError("SELECT …", {}, sqlite3.OperationalError("no such table: dead_letters"))
    assert "run `compensa db upgrade`" in explain_database_error(missing)


def test_a_refused_query_is_not_reported_as_an_unreachable_database(migrated: None) -> None:
    import sqlite3

    path = get_settings().database_url.split("///", 1)[1]
    with sqlite3.connect(path) as connection:
        connection.execute("ALTER TABLE dead_letters RENAME COLUMN reason TO reason_renamed")
    line = one_line_error(cli("dlq", "list"), "refused the query", "no such column")
    assert "cannot reach" not in line and "unreachable" not in line


def test_ids_beyond_the_bind_parameter_limit_are_queried_in_batches(migrated: None) -> None:
    from infra.db import create_engine
    from infra.dlq.query import DeadLetterFilter, missing_ids, purge

    ids = store_rows(letters=("ord-1", "ord-2"))
    many = tuple(range(1, 40_001))  # SQLite takes at most 32,766 bind parameters, PostgreSQL 32,767

    async def run() -> tuple[list[int], int]:
        engine = create_engine(get_settings().database_url)
        try:
            async with engine.connect() as connection:
                missing = await missing_ids(connection, many)
            return missing, await purge(engine, DeadLetterFilter(ids=many), NOW)
        finally:
            await engine.dispose()

    missing, purged = asyncio.run(run())
    assert len(missing) == 40_000 - 2 and not set(ids.values()) & set(missing)
    assert purged == 2
    assert DeadLetterFilter(ids=many).describe() == "ids=1-40000"
    assert DeadLetterFilter(ids=(1, 2, 3, 7, 9, 10)).describe() == "ids=1-3,7,9-10"


def test_dlq_show_of_a_deep_or_huge_or_damaged_stored_body_shows_it_as_text(migrated: None) -> None:
    from sqlalchemy import update

    from infra.db import create_engine
    from infra.dlq.tables import dead_letters

    ids = store_rows(letters=("deep", "digits", "headers"))
    bodies = {
        "deep": '{"payload": ' + "[" * 5_000 + "]" * 5_000 + "}",  # json and Rich recurse: shown as text, not parsed
        "digits": '{"payload": {"amount": ' + "9" * 5_000 + "}}",  # beyond Python's 4,300-digit limit
        "headers": '{"payload": {"order_id": "headers"}}',
    }

    async def damage() -> None:
        engine = create_engine(get_settings().database_url)
        try:
            async with engine.begin() as connection:
                for saga_id, body in bodies.items():
                    await connection.execute(update(dead_letters).where(dead_letters.c.id == ids[saga_id]).values(body=body))
                await connection.execute(update(dead_letters).where(dead_letters.c.id == ids["headers"]).values(headers="[1, 2"))
        finally:
            await engine.dispose()

    asyncio.run(damage())
    for saga_id in bodies:
        shown = assert_rendered(cli("dlq", "show", str(ids[saga_id])))
        assert f"dead letter {ids[saga_id]}" in shown
        document = json.loads(assert_rendered(cli("dlq", "show", str(ids[saga_id]), "--json")))
        assert document["dead_letter"]["saga_id"] == saga_id
    assert "body (text)" in assert_rendered(cli("dlq", "show", str(ids["deep"])))
    assert "body (text)" in assert_rendered(cli("dlq", "show", str(ids["digits"])))
    damaged = json.loads(cli("dlq", "show", str(ids["headers"]), "--json").stdout)["dead_letter"]
    assert damaged["headers"] == {"(stored headers)": "[1, 2"} and damaged["body_form"] == "json"
