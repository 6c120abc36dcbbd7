"""The core CLI on the embedded default: schema, stock, orders, sagas, outbox, contracts."""

import json

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
