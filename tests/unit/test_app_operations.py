"""Operator commands of a hosted app (`--app`): health, outbox status, dead letters and the console
watch the app's queues, dead-letter queues and outboxes (`infra.apps.footprint`), over SQLite."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import insert, select

from contracts import encode, new_message
from examples.trip.app import app as trip_app
from examples.trip.contracts import BookCar
from infra import topology as t
from infra.apps import ORDER_APP, app_queues, footprint
from infra.bootstrap import OUTBOX_SERVICES
from infra.clock import SystemClock, VirtualClock
from infra.db import create_engine
from infra.dlq.archive import dead_letter_row
from infra.dlq.tables import dead_letters
from infra.settings import get_settings
from infra.transport.memory import MemoryBroker, MemoryDelivery, StoredMessage
from outbox.tables import tables_for
from outbox.uow import UnitOfWork
from tests.support import contracts_of_apps_forgotten
from tests.unit.support import NOW, cli, one_line_error

TRIP = "examples.trip.app:app"
TRIP_QUEUES = ["trip.saga.events", "flights.commands", "cars.commands", "hotels.commands", "trip.saga.starts"]
TRIP_OUTBOXES = ["flights", "cars", "hotels", "saga", "ingest", "dlq"]


@pytest.fixture(autouse=True)
def _forget_app_contracts() -> Iterator[None]:
    with contracts_of_apps_forgotten():
        yield


@pytest.fixture
def trip_tables(migrated: None) -> None:
    """compensa's schema and the trip app's tables (its participants' outboxes and inboxes too)."""
    result = cli("db", "upgrade", "--app", TRIP)
    assert result.exit_code == 0, result.stderr


def _run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def test_the_order_apps_footprint_is_the_named_topology_and_outboxes() -> None:
    order = footprint(ORDER_APP)

    assert order.queues == t.WORK_QUEUES
    assert order.dead_letter_queues == t.DEAD_LETTER_QUEUES
    assert order.outboxes == OUTBOX_SERVICES


def test_an_apps_footprint_is_its_queues_their_dlqs_and_its_participants_outboxes() -> None:
    trip = footprint(trip_app)

    assert trip.queues == app_queues(trip_app)
    assert trip.queue_names == TRIP_QUEUES
    assert [q.name for q in trip.dead_letter_queues] == [f"{name}.dlq" for name in TRIP_QUEUES]
    assert {q.service for q in trip.dead_letter_queues} == {"dlq"}
    assert list(trip.outboxes) == TRIP_OUTBOXES
    assert trip.consuming_queue("cars.commands", "car.cancel") == app_queues(trip_app)[2]
    assert trip.consuming_queue("cars.commands", "hotel.book") is None
    assert trip.consuming_queue("stock.commands", "stock.reserve") is None


def test_health_with_an_app_checks_its_queues_and_outboxes(trip_tables: None) -> None:
    result = cli("health", "--app", TRIP, "--json")

    assert result.exit_code == 0, result.stdout
    checks = json.loads(result.stdout)["checks"]  # keys sorted
    assert set(checks["relay"]["outboxes"]) == set(TRIP_OUTBOXES)
    assert set(checks["dead_letters"]["queues"]) == set(TRIP_QUEUES)
    # Its starts come from upstream: "orders without a saga" is the order app's check.
    assert "saga_starts" not in checks

    default = json.loads(cli("health", "--json").stdout)["checks"]
    assert set(default["relay"]["outboxes"]) == set(OUTBOX_SERVICES)
    assert set(default["dead_letters"]["queues"]) == {q.name for q in t.WORK_QUEUES}
    assert "saga_starts" in default


def test_health_served_for_an_app_reports_its_outboxes(trip_tables: None) -> None:
    from infra.health import health_app

    with TestClient(health_app(get_settings(), saga_app=trip_app)) as client:
        response = client.get("/health")

    assert response.status_code == 200, response.text
    assert list(response.json()["checks"]["relay"]["outboxes"]) == TRIP_OUTBOXES


def test_outbox_status_with_an_app_lists_its_participants_outboxes(trip_tables: None) -> None:
    async def stage_a_car_booking() -> None:
        engine = create_engine(get_settings().database_url)
        try:
            async with UnitOfWork(engine, "cars", SystemClock()) as uow:
                uow.send(BookCar(trip_id="trip-1", location="LIS"), correlation_id="trip-1")
                await uow.commit()
        finally:
            await engine.dispose()

    _run(stage_a_car_booking())
    result = cli("outbox", "status", "--app", TRIP, "--json")

    assert result.exit_code == 0, result.stderr
    pending = {row["service"]: row["pending"] for row in json.loads(result.stdout)}
    assert list(pending) == TRIP_OUTBOXES
    assert pending["cars"] == 1 and pending["flights"] == pending["hotels"] == 0

    default = cli("outbox", "status", "--json")
    assert [row["service"] for row in json.loads(default.stdout)] == list(OUTBOX_SERVICES)


def _archive_a_car_booking() -> int:
    """A `car.book` dead-lettered from cars.commands, archived as the archive stores it; its id."""
    message = new_message(BookCar(trip_id="trip-7", location="LIS"), correlation_id="trip-7", producer="test")
    headers = {
        t.H_REASON_CLASS: "handler_error",
        t.H_REASON: "RuntimeError: boom",
        t.H_ATTEMPT: 3,
        t.H_ORIGINAL_EXCHANGE: t.COMMANDS.name,
        t.H_ORIGINAL_ROUTING_KEY: "car.book",
        t.H_ORIGINAL_QUEUE: "cars.commands",
        t.H_FIRST_FAILURE: NOW.isoformat(),
        t.H_LAST_FAILURE: NOW.isoformat(),
        t.H_SAGA_ID: "trip-7",
    }
    dlq = footprint(trip_app).dead_letter_queues[2]
    stored = StoredMessage(encode(message.envelope), headers, str(message.message_id), t.DLX.name, "cars.commands", "trip-7")
    row = dead_letter_row(MemoryDelivery(MemoryBroker(VirtualClock()), dlq, stored), NOW)

    async def store() -> int:
        engine = create_engine(get_settings().database_url)
        try:
            async with engine.begin() as connection:
                return int((await connection.execute(insert(dead_letters).values(row).returning(dead_letters.c.id))).scalar_one())
        finally:
            await engine.dispose()

    return int(_run(store()))


def test_dead_letters_of_an_app_are_listed_and_replayed_to_its_queues(trip_tables: None) -> None:
    letter = _archive_a_car_booking()

    listed = cli("dlq", "list", "--app", TRIP, "--queue", "cars.commands", "--type", "car.book", "--json")
    assert listed.exit_code == 0, listed.stderr
    assert [(r["id"], r["queue"], r["saga_id"]) for r in json.loads(listed.stdout)["dead_letters"]] == [
        (letter, "cars.commands", "trip-7")
    ]
    one_line_error(cli("dlq", "list", "--queue", "cars.commands"), "--queue: unknown queue 'cars.commands'", "stock.commands")

    # Without the app its queue is not in the topology: refused, nothing written.
    refused = cli("dlq", "replay", str(letter), "--json")
    assert refused.exit_code == 1
    assert "queue 'cars.commands' is not in the topology" in json.loads(refused.stdout)["outcomes"][0]["detail"]

    dry = cli("dlq", "replay", str(letter), "--app", TRIP, "--dry-run", "--json")
    assert dry.exit_code == 0, dry.stdout
    assert json.loads(dry.stdout)["outcomes"][0]["detail"] == "would send to queue cars.commands"

    replayed = cli("dlq", "replay", str(letter), "--app", TRIP, "--json")
    assert replayed.exit_code == 0, replayed.stdout
    assert json.loads(replayed.stdout)["replayed"] == 1

    async def queued() -> list[tuple[str, str]]:
        outbox = tables_for("dlq").outbox
        engine = create_engine(get_settings().database_url)
        try:
            async with engine.connect() as connection:
                return [tuple(r) for r in (await connection.execute(select(outbox.c.type, outbox.c.routing_key))).all()]
        finally:
            await engine.dispose()

    assert _run(queued()) == [("car.book", "cars.commands")]
    shown = cli("dlq", "show", str(letter), "--app", TRIP, "--json")
    assert json.loads(shown.stdout)["dead_letter"]["status"] == "replayed"


def test_the_console_of_an_app_filters_and_replays_by_its_queues(trip_tables: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from infra.console.app import APP_VARIABLE, app_from_environment, create_app

    console = create_app(get_settings(), saga_app=trip_app).state.console
    assert list(console.queues) == TRIP_QUEUES
    assert "trip" in console.orchestrator.definitions

    monkeypatch.setenv(APP_VARIABLE, TRIP)
    assert list(app_from_environment().state.console.queues) == TRIP_QUEUES
    monkeypatch.delenv(APP_VARIABLE)
    assert list(app_from_environment().state.console.queues) == [q.name for q in t.WORK_QUEUES]
