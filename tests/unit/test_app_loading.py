"""Saga applications: loading `--app module:attr`, and the checks an app passes at load time."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from contracts.envelope import REGISTRY
from examples.trip import contracts as trip
from examples.trip.app import app as trip_app
from examples.trip.saga import TRIP_SAGA
from infra.apps import ORDER_APP, app_queues, load_app, resolve_app
from infra.bootstrap import bootstrap, message_services, outbox_services
from infra.settings import Settings
from infra.topology import WORK_QUEUES
from sagas.app import SagaApp
from tests.support import COMPENSA, contracts_of_apps_forgotten

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _forget_app_contracts() -> Iterator[None]:
    with contracts_of_apps_forgotten():
        yield


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPENSA_")}
    return subprocess.run([COMPENSA, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60, check=False)


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("nosuch:app", "error: --app nosuch:app: no module named 'nosuch'"),
        (
            "examples.trip.app:missing",
            "error: --app examples.trip.app:missing: module examples.trip.app has no attribute 'missing'",
        ),
        (
            "examples.trip.simulation:PIECES",
            "error: --app examples.trip.simulation:PIECES: PIECES is a SimulationPieces, not a sagas.app.SagaApp",
        ),
        ("examples.trip.app", "error: --app: expected module:attribute, got 'examples.trip.app'"),
    ],
    ids=["no-module", "no-attribute", "not-an-app", "no-colon"],
)
@pytest.mark.parametrize(
    "command",
    [
        ["simulate"],
        ["run"],
        ["saga", "list"],
        ["db", "upgrade"],
        ["topology", "declare"],
        ["health"],
        ["outbox", "status"],
        ["dlq", "list"],
        ["console"],
    ],
)
def test_an_app_that_does_not_load_is_one_line_and_exit_2(command: list[str], reference: str, message: str) -> None:
    run = cli(*command, "--app", reference)

    assert run.returncode == 2, (run.stdout, run.stderr)
    assert run.stderr.strip() == message
    assert "Traceback" not in run.stdout + run.stderr


def test_an_app_loads_and_registers_its_contracts() -> None:
    app = load_app("examples.trip.app:app", str(ROOT))

    assert app is trip_app
    assert REGISTRY.model_for("trip.requested", 1) is trip.TripRequested
    assert resolve_app(None) is ORDER_APP


def test_a_contract_that_clashes_with_a_registered_one_is_refused() -> None:
    class Impostor(trip.TripPayload):
        message_type = "stock.reserve"
        kind = "command"

    with pytest.raises(
        ValueError, match=r"contract \('stock.reserve', 1\) is already registered as contracts.messages.ReserveStock"
    ):
        REGISTRY.extend([Impostor])


def test_the_order_app_keeps_the_named_topology_and_services() -> None:
    assert app_queues(ORDER_APP) == WORK_QUEUES
    assert message_services(ORDER_APP) == ("saga", "stock", "payments", "ledger", "orders")
    assert list(bootstrap(Settings.model_construct()).services) == ["saga", "stock", "payments", "ledger", "orders"]


def test_an_apps_topology_and_services_come_from_its_participants() -> None:
    queues = {q.name: q for q in app_queues(trip_app)}

    assert set(queues) == {"trip.saga.events", "trip.saga.starts", "flights.commands", "cars.commands", "hotels.commands"}
    assert queues["trip.saga.starts"].routing_keys == ("trip.requested",)
    assert queues["cars.commands"].routing_keys == ("car.book", "car.cancel")
    assert queues["cars.commands"].exchange.name == "compensa.commands"
    assert "car.cancelled" in queues["trip.saga.events"].routing_keys
    assert outbox_services(trip_app)[-3:] == ("flights", "cars", "hotels")
    registry = bootstrap(Settings.model_construct(), app=trip_app)
    assert list(registry.services) == ["saga", "flights", "cars", "hotels"]
    assert registry.breakers == {}  # no participant asked for the payment gateway


def test_an_app_whose_saga_sends_a_command_nobody_handles_is_refused() -> None:
    without_cars = tuple(p for p in trip_app.participants if p.name != "cars")

    with pytest.raises(ValueError, match=r"saga 'trip' sends car.book, car.cancel, which no participant handles"):
        replace(trip_app, participants=without_cars)


def test_an_app_must_declare_the_messages_it_uses() -> None:
    messages = tuple(m for m in trip_app.messages if m is not trip.HotelCancelled)

    with pytest.raises(ValueError, match=r"saga 'trip' uses hotel.cancelled, not among the app's messages"):
        SagaApp("trip", (TRIP_SAGA,), messages, trip_app.participants[:0])


def test_two_queues_of_one_name_are_refused() -> None:
    with pytest.raises(ValueError, match="uses one queue twice"):
        replace(trip_app, saga_starts_queue="trip.saga.events")


def test_a_participant_may_not_take_a_compensa_service_name() -> None:
    with pytest.raises(ValueError, match="participant name 'ingest' is reserved"):
        replace(trip_app, participants=(replace(trip_app.participants[0], name="ingest"), *trip_app.participants[1:]))


def test_saga_list_lists_the_hosted_apps_sagas_only(migrated: None) -> None:
    """Two apps on one database: each `saga list` shows its own definitions' sagas."""
    import json
    import sqlite3

    from infra.settings import get_settings
    from tests.unit.support import cli, store_rows

    store_rows(sagas=("o-1", "trip-1", "trip-2"))
    with sqlite3.connect(get_settings().database_url.split("///", 1)[1]) as connection:
        connection.execute("UPDATE saga_instances SET definition = 'trip' WHERE saga_id LIKE 'trip-%'")

    orders = cli("saga", "list", "--json")
    trips = cli("saga", "list", "--app", "examples.trip.app:app", "--json")
    stuck_trips = cli("saga", "list", "--app", "examples.trip.app:app", "--status", "running", "--json")

    assert orders.exit_code == 0, orders.stderr
    assert [row["saga_id"] for row in json.loads(orders.stdout)] == ["o-1"]
    assert trips.exit_code == 0, trips.stderr
    assert sorted(row["saga_id"] for row in json.loads(trips.stdout)) == ["trip-1", "trip-2"]
    assert sorted(row["saga_id"] for row in json.loads(stuck_trips.stdout)) == ["trip-1", "trip-2"]
