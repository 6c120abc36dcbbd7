"""The core CLI on the embedded default: schema, stock, orders, sagas, outbox, contracts."""

import json

import pytest

from tests.unit.support import NASTY_IDS, assert_rendered, cli, one_line_error, store_rows, table_cells


def test_operator_can_set_stock_place_an_order_and_see_it_pending(env, tmp_path):
    assert cli("db", "upgrade").exit_code == 0
    assert cli("stock", "set", "SKU-001", "40").exit_code == 0
    levels = json.loads(cli("stock", "list", "--json").stdout)
    assert levels == {"SKU-001": {"on_hand": 40, "reserved": 0}}
    placed = cli("order", "place", "--order-id", "o-1", "--customer", "c-1", "--line", "SKU-001:2:1500", "--token", "tok_ok_1")
    assert placed.exit_code == 0, placed.stderr
    status = json.loads(cli("outbox", "status", "--json").stdout)
    assert {row["service"]: row["pending"] for row in status}["orders"] == 1


def test_bad_arguments_are_refused_precisely(env):
    assert cli("db", "upgrade").exit_code == 0
    negative = cli("stock", "set", "SKU-001", "-3")
    assert negative.exit_code == 2 and "-3" in negative.stderr
    bad_line = cli("order", "place", "--customer", "c", "--line", "SKU-001:two:1500", "--token", "t")
    assert bad_line.exit_code == 2 and "SKU:QUANTITY:UNIT_PRICE_MINOR" in bad_line.stderr
    one_line_error(cli("saga", "show", "nope"), "no saga 'nope'")
    one_line_error(cli("run", "--service", "warehouse"), "unknown service(s) warehouse")


def test_contracts_export_writes_every_schema_and_asyncapi(env, tmp_path):
    out = tmp_path / "contracts"
    assert cli("contracts", "export", "--out", str(out)).exit_code == 0
    assert len(list((out / "schemas").glob("*.json"))) == 18
    assert json.loads((out / "asyncapi.json").read_text())["asyncapi"] == "3.0.0"


def test_saga_list_and_show_print_stored_markup_and_escapes_as_text_with_whole_ids_at_80_columns(migrated, narrow, monkeypatch):
    import infra.cli.common
    from infra.cli.common import visible

    long_id = "ord-" + "0123456789" * 6  # 64 characters, the longest saga id
    store_rows(sagas=(*NASTY_IDS, long_id))

    listed = assert_rendered(cli("saga", "list"), narrow)
    assert sorted(table_cells(listed, "saga")) == sorted(visible(s) for s in (*NASTY_IDS, long_id))
    assert "not shown at 80 columns: step, started (UTC)" in " ".join(listed.split())
    for saga_id in (*NASTY_IDS, long_id):
        shown = assert_rendered(cli("saga", "show", saga_id))
        words = " ".join(shown.split())  # the heading wraps at 80 columns, between words
        assert words.startswith(f"saga {visible(saga_id)}: running (version 1) held by [bold]{visible(saga_id)} ┏━")
        assert "…" not in shown  # the history table wraps and folds to 80 columns, cutting nothing
        mermaid = assert_rendered(cli("saga", "show", saga_id, "--mermaid"))
        assert f"participant Saga as Saga {visible(saga_id)}" in mermaid and "Saga->>Stock: stock.reserve[/]" in mermaid
        assert json.loads(cli("saga", "show", saga_id, "--json").stdout)["saga"]["saga_id"] == saga_id
    assert_rendered(cli("saga", "list", "--status", "running", "--stuck-for", "1s"), narrow)
    monkeypatch.setattr(infra.cli.common.console, "_width", 200)
    history = assert_rendered(cli("saga", "show", NASTY_IDS[0]))
    assert table_cells(history, "sent") == ["stock.reserve[/]"] and table_cells(history, "note") == ["note [/] \\x1b[2J"]


def test_input_echoed_back_is_never_markup(migrated):
    set_stock = assert_rendered(cli("stock", "set", "[/]\x1b[31m", "3"))
    assert set_stock == "[/]\\x1b[31m: 3 on hand\n"
    assert "[/]\\x1b[31m" in assert_rendered(cli("stock", "list"))
    one_line_error(cli("saga", "show", "[/]"), "no saga '[/]'")
    one_line_error(cli("saga", "list", "--status", "[bold]"), "unknown status '[bold]'")
    one_line_error(cli("run", "--service", "[/]"), "unknown service(s) [/]")
    declared = cli("topology", "declare")  # the in-memory broker: `[routing keys]` are text, not a style tag
    assert declared.exit_code == 0 and "[stock.reserve, stock.commit, stock.release]" in " ".join(declared.stdout.split())


def test_saga_list_refuses_huge_durations_in_one_line(migrated):
    one_line_error(
        cli("saga", "list", "--older-than", "99999999999d"), "--older-than: duration '99999999999d' is longer than 100 years"
    )
    one_line_error(cli("saga", "list", "--stuck-for", "1" * 400), "--stuck-for: duration", "longer than 100 years")


def test_a_refused_saga_query_is_not_reported_as_an_unreachable_database(migrated):
    import sqlite3

    from infra.settings import get_settings

    with sqlite3.connect(get_settings().database_url.split("///", 1)[1]) as connection:
        connection.execute("ALTER TABLE saga_instances RENAME COLUMN reason TO reason_renamed")
    line = one_line_error(cli("saga", "list"), "refused the query", "no such column")
    assert "unreachable" not in line and "cannot reach" not in line


def test_saga_list_stuck_for_also_shows_orders_that_never_got_a_saga(migrated, narrow, monkeypatch):
    import asyncio
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import insert, update

    import infra.cli.common
    from consumers.orders.tables import orders_orders
    from contracts import Money, OrderCreated, OrderLine, new_message
    from infra.db import create_engine
    from infra.settings import get_settings
    from outbox.tables import tables_for
    from outbox.uow import outbox_row

    long_id = "ord-" + "0123456789" * 6  # 64 characters: shown whole
    for order_id in (long_id, "o-started"):
        placed = cli("order", "place", "--order-id", order_id, "--customer", "c", "--line", "SKU-1:1:100", "--token", "tok_ok")
        assert placed.exit_code == 0, placed.stderr
    store_rows(sagas=("o-started",))
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)

    async def age_them() -> None:
        engine = create_engine(get_settings().database_url)
        try:
            async with engine.begin() as connection:
                await connection.execute(update(orders_orders).values(created_at=an_hour_ago))
                # The order placed here also left its order.created; it is one order, listed once.
                await connection.execute(update(tables_for("orders").outbox).values(sent_at=an_hour_ago))
                event = OrderCreated(
                    order_id="o-ingest",
                    customer_id="c",
                    lines=(OrderLine(sku="SKU-1", quantity=1, unit_price=100),),
                    total=Money(amount=100, currency="EUR"),
                    payment_token="tok_ok",
                )
                row = outbox_row(new_message(event, correlation_id="o-ingest", producer="erp"), an_hour_ago)
                await connection.execute(insert(tables_for("ingest").outbox).values(**row, sent_at=an_hour_ago))
        finally:
            await engine.dispose()

    asyncio.run(age_them())

    rows = json.loads(cli("saga", "list", "--stuck-for", "5m", "--json").stdout)
    unstarted = {r["saga_id"]: r for r in rows if r["status"] == "no saga"}
    assert set(unstarted) == {long_id, "o-ingest"}  # o-started has its saga
    assert unstarted[long_id]["reason"] == "pending order, no saga after 300s"
    assert unstarted["o-ingest"]["reason"] == "order.created sent from the ingest outbox, no saga after 300s"
    listed = assert_rendered(cli("saga", "list", "--stuck-for", "5m"), narrow)
    assert sorted(table_cells(listed, "saga")) == sorted(["o-started", long_id, "o-ingest"])
    assert "orders with no saga after 300s: 1 pending, 2 order.created sent" in " ".join(listed.split())
    monkeypatch.setattr(infra.cli.common.console, "_width", 200)
    wide = assert_rendered(cli("saga", "list", "--stuck-for", "5m"), 200)
    assert sorted(table_cells(wide, "status")) == ["no saga", "no saga", "running"]
    # Not past the bound, or not asked for: no order without a saga is listed.
    for args in (("--stuck-for", "2h"), ("--status", "running", "--stuck-for", "5m"), ()):
        rows = json.loads(cli("saga", "list", *args, "--json").stdout)
        assert "no saga" not in {r["status"] for r in rows}, args


# ---------------------------------------------------------------- --json, settings, fresh database (issue 17, item 4)


def leaf_commands():
    """Every runnable command of the tree, as its words (`("dlq", "list")`) and its click command."""
    import typer
    from typer.core import TyperGroup

    from infra.cli.main import app

    def walk(command, words):
        if isinstance(command, TyperGroup):
            for name, sub in command.commands.items():
                yield from walk(sub, (*words, name))
        else:
            yield words, command

    return list(walk(typer.main.get_command(app), ()))


LEAVES = leaf_commands()


def test_the_tree_walk_sees_every_group():
    assert {words[0] for words, _ in LEAVES} >= {"db", "saga", "dlq", "bench", "broker", "operators", "audit", "simulate", "run"}


@pytest.mark.parametrize(("words", "command"), LEAVES, ids=[" ".join(words) for words, _ in LEAVES])
def test_every_command_takes_json_as_the_readme_promises(words, command):
    options = {opt for param in command.params for opt in param.opts}
    assert "--json" in options, f"compensa {' '.join(words)} has no --json"
    assert "--json" in cli(*words, "--help").stdout


def one_json_document(result, exit_code=0):
    """Exactly one JSON document on stdout (and no traceback anywhere); its value."""
    assert result.exit_code == exit_code, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    return json.loads(result.stdout)  # one document: json.loads refuses trailing data


def test_commands_that_print_a_line_print_one_json_document_with_json(migrated, tmp_path):
    assert one_json_document(cli("db", "upgrade", "--json"))["revision"]
    assert one_json_document(cli("stock", "set", "SKU-1", "5", "--json")) == {"sku": "SKU-1", "on_hand": 5}
    placed = cli("order", "place", "--order-id", "o-1", "--customer", "c", "--line", "SKU-1:1:100", "--token", "t", "--json")
    assert one_json_document(placed) == {"order_id": "o-1"}
    queues = one_json_document(cli("topology", "declare", "--json"))["queues"]
    stock = next(q for q in queues if q["name"] == "stock.commands")
    assert stock["dlq"] == "stock.commands.dlq" and "stock.reserve" in stock["routing_keys"]
    exported = one_json_document(cli("contracts", "export", "--out", str(tmp_path / "c"), "--json"))
    assert exported["schemas"] == 18 and exported["asyncapi"] == str(tmp_path / "c" / "asyncapi.json")
    added = one_json_document(cli("operators", "add", "ada", "--role", "operator", "--json"))
    assert added["name"] == "ada" and added["role"] == "operator" and added["token"]
    assert one_json_document(cli("operators", "revoke", "ada", "--json")) == {"revoked": [added["key_id"]], "target": "ada"}
    key = one_json_document(cli("producers", "add", "erp", "--types", "order.created", "--json"))
    assert key["name"] == "erp" and key["types"] == ["order.created"] and key["key"]
    assert one_json_document(cli("producers", "revoke", "erp", "--json")) == {"revoked": 1, "target": "erp"}


def test_broker_definitions_with_json_says_what_it_wrote(env, tmp_path, monkeypatch):
    from infra.broker_access import compensa_grants
    from infra.cli.broker import password_variable

    for grant in compensa_grants():
        monkeypatch.setenv(password_variable(grant.user), "pw-" + grant.user)
    written = one_json_document(cli("broker", "definitions", "--out", str(tmp_path / "d.json"), "--json"))
    assert written["out"] == str(tmp_path / "d.json") and written["vhost"] == "/"
    assert {u["user"] for u in written["users"]} == {g.user for g in compensa_grants()}
    assert "pw-" not in json.dumps(written)  # permissions only, never a password or hash


def test_a_failure_with_json_is_one_error_object_on_stdout(migrated):
    missing = one_json_document(cli("saga", "show", "nope", "--json"), exit_code=1)
    assert missing == {"ok": False, "error": "no saga 'nope'; `compensa saga list` shows the known ones"}
    bad_line = cli("order", "place", "--customer", "c", "--line", "SKU-1:two:1", "--token", "t", "--json")
    assert one_json_document(bad_line, exit_code=2) == {
        "ok": False,
        "error": "Invalid value for --line: expected SKU:QUANTITY:UNIT_PRICE_MINOR, got 'SKU-1:two:1'",
    }
    refused = one_json_document(cli("health", "--metrics-port", "9100", "--json"), exit_code=2)
    assert refused["error"] == "--metrics-port needs --serve (a one-off check has nothing to scrape)"
    assert one_json_document(cli("api", "--json"), exit_code=1) == {
        "ok": False,
        "error": "the ingest API needs Redis: set COMPENSA_REDIS_URL",
    }


@pytest.mark.parametrize(
    "args",
    [
        ("saga", "list"),
        ("dlq", "list"),
        ("health",),
        ("db", "upgrade"),
        ("topology", "declare"),
        ("stock", "list"),
        ("order", "place", "--customer", "c", "--line", "SKU-1:1:1", "--token", "t"),
        ("contracts", "export", "--out", "/nonexistent/never-written"),
        ("outbox", "status"),
        ("producers", "list"),
        ("operators", "list"),
        ("audit", "list"),
        ("broker", "grant"),
        ("run",),
        ("relay",),
        ("api",),
        ("console",),
        ("bench", "relay"),
    ],
    ids=lambda args: " ".join(args[:2]),
)
def test_a_bad_compensa_value_is_one_line_naming_the_variable_exit_2(env, monkeypatch, args):
    monkeypatch.setenv("COMPENSA_PREFETCH", "abc")
    result = cli(*args)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr == (
        "error: COMPENSA_PREFETCH='abc': input should be a valid integer, unable to parse string as an integer\n"
    )
    as_json = one_json_document(cli(*args, "--json"), exit_code=2)
    assert as_json == {
        "ok": False,
        "error": "COMPENSA_PREFETCH='abc': input should be a valid integer, unable to parse string as an integer",
    }


@pytest.mark.parametrize(
    ("variable", "value", "expected", "secret"),
    [
        ("COMPENSA_PREFETCH", "0", "COMPENSA_PREFETCH='0': input should be greater than or equal to 1", None),
        ("COMPENSA_QUEUE_TYPE", "lazy", "COMPENSA_QUEUE_TYPE='lazy': input should be 'classic' or 'quorum'", None),
        (
            "COMPENSA_DATABASE_URL",
            "mysql://ops:s3cret@db/x",
            "COMPENSA_DATABASE_URL='mysql://ops:***@db/x': unsupported database 'mysql'; "
            "expected sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER@HOST:PORT/DATABASE",
            "s3cret",
        ),
        (
            "COMPENSA_DATABASE_URL",
            "postgresql+asyncpg://ops:s3cret@db:port/x",
            "COMPENSA_DATABASE_URL='postgresql+asyncpg://ops:***@db:port/x': not a database URL; "
            "expected sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER@HOST:PORT/DATABASE",
            "s3cret",
        ),
        (
            "COMPENSA_CONSOLE_SECRET",
            "tooshort-s3cret",
            "COMPENSA_CONSOLE_SECRET (value hidden): string should have at least 32 characters",
            "s3cret",
        ),
    ],
    ids=["range", "choice", "database-scheme", "database-port", "console-secret"],
)
def test_a_bad_compensa_value_says_what_is_expected_and_never_echoes_a_secret(
    env, monkeypatch, variable, value, expected, secret
):
    monkeypatch.setenv(variable, value)
    result = cli("saga", "list")
    assert result.exit_code == 2 and result.stderr == f"error: {expected}\n", result.stderr
    if secret:
        assert secret not in result.stdout + result.stderr


FRESH_DATABASE_COMMANDS = [
    ("saga", "list"),
    ("saga", "show", "o-1"),
    ("saga", "retry", "o-1"),
    ("dlq", "list"),
    ("dlq", "show", "1"),
    ("outbox", "status"),
    ("stock", "list"),
    ("stock", "set", "SKU-1", "3"),
    ("order", "place", "--customer", "c", "--line", "SKU-1:1:1", "--token", "t"),
    ("producers", "list"),
    ("audit", "list"),
    ("operators", "list"),
    ("operators", "add", "ada"),
    ("run",),
    ("relay",),
    ("console",),
]


@pytest.mark.parametrize("args", FRESH_DATABASE_COMMANDS, ids=lambda args: " ".join(args[:2]))
def test_on_a_fresh_database_every_command_says_run_db_upgrade(env, args):
    line = one_line_error(cli(*args), "has no compensa tables yet", "run `compensa db upgrade`")
    assert "cannot reach" not in line and "unreachable" not in line
    assert one_json_document(cli(*args, "--json"), exit_code=1)["error"] == line.removeprefix("error: ")


def test_health_on_a_fresh_database_says_run_db_upgrade(env):
    report = one_json_document(cli("health", "--json"), exit_code=1)
    assert report["checks"]["database"]["fix"] == "run `compensa db upgrade`"


def test_ids_are_whole_at_80_columns_in_every_listing(migrated, narrow):
    long_name = "op." + "n" * 61  # 64 characters, the longest operator name
    assert cli("operators", "add", long_name, "--role", "operator").exit_code == 0
    producer = "erp-" + "p" * 60
    assert cli("producers", "add", producer, "--types", "order.created,order.cancelled").exit_code == 0
    operators = one_json_document(cli("operators", "list", "--json"))
    producers = one_json_document(cli("producers", "list", "--json"))
    audit = one_json_document(cli("audit", "list", "--json"))

    listed = assert_rendered(cli("operators", "list"), narrow)
    # A 64-character name and the token id cannot share 80 columns: both fold, whole, over lines of the one row.
    assert "".join(table_cells(listed, "operator")) == long_name
    assert "".join(table_cells(listed, "token id")) == operators[0]["key_id"]
    listed = assert_rendered(cli("producers", "list"), narrow)
    assert table_cells(listed, "key id") == [producers[0]["key_id"]]
    assert "not shown at 80 columns" in listed
    listed = assert_rendered(cli("audit", "list"), narrow)
    assert table_cells(listed, "id") == [str(row["id"]) for row in audit]


def test_commands_run_on_uvloop_unless_told_asyncio(monkeypatch):
    import sys

    import uvloop

    from infra.cli.common import event_loop_factory
    from infra.settings import SettingsError

    assert event_loop_factory("auto") is uvloop.new_event_loop
    assert event_loop_factory("uvloop") is uvloop.new_event_loop
    assert event_loop_factory("asyncio") is None
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as on a platform without uvloop
    assert event_loop_factory("auto") is None
    with pytest.raises(SettingsError, match="COMPENSA_EVENT_LOOP='uvloop': uvloop is not installed"):
        event_loop_factory("uvloop")


@pytest.mark.parametrize("loop", ["auto", "uvloop", "asyncio"])
def test_a_command_runs_on_each_event_loop(env, monkeypatch, loop):
    monkeypatch.setenv("COMPENSA_EVENT_LOOP", loop)
    assert cli("db", "upgrade").exit_code == 0
    result = cli("saga", "list", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_an_unknown_event_loop_is_refused_naming_the_choices(env, monkeypatch):
    monkeypatch.setenv("COMPENSA_EVENT_LOOP", "trio")
    result = cli("saga", "list")
    assert result.exit_code == 2
    assert result.stderr == "error: COMPENSA_EVENT_LOOP='trio': input should be 'auto', 'uvloop' or 'asyncio'\n"
