"""The core CLI on the embedded default: schema, stock, orders, sagas, outbox, contracts."""

import json

from tests.unit.test_cli_ops import cli, env, one_line_error  # noqa: F401 - fixtures and helpers


def test_operator_can_set_stock_place_an_order_and_see_it_pending(env, tmp_path):  # noqa: F811
    assert cli("db", "upgrade").exit_code == 0
    assert cli("stock", "set", "SKU-001", "40").exit_code == 0
    levels = json.loads(cli("stock", "list", "--json").stdout)
    assert levels == {"SKU-001": {"on_hand": 40, "reserved": 0}}
    placed = cli("order", "place", "--order-id", "o-1", "--customer", "c-1", "--line", "SKU-001:2:1500", "--token", "tok_ok_1")
    assert placed.exit_code == 0, placed.stderr
    status = json.loads(cli("outbox", "status", "--json").stdout)
    assert {row["service"]: row["pending"] for row in status}["orders"] == 1


def test_bad_arguments_are_refused_precisely(env):  # noqa: F811
    assert cli("db", "upgrade").exit_code == 0
    negative = cli("stock", "set", "SKU-001", "-3")
    assert negative.exit_code == 2 and "-3" in negative.stderr
    bad_line = cli("order", "place", "--customer", "c", "--line", "SKU-001:two:1500", "--token", "t")
    assert bad_line.exit_code == 2 and "SKU:QUANTITY:UNIT_PRICE_MINOR" in bad_line.stderr
    one_line_error(cli("saga", "show", "nope"), "no saga 'nope'")
    one_line_error(cli("run", "--service", "warehouse"), "unknown service(s) warehouse")


def test_contracts_export_writes_every_schema_and_asyncapi(env, tmp_path):  # noqa: F811
    out = tmp_path / "contracts"
    assert cli("contracts", "export", "--out", str(out)).exit_code == 0
    assert len(list((out / "schemas").glob("*.json"))) == 18
    assert json.loads((out / "asyncapi.json").read_text())["asyncapi"] == "3.0.0"
