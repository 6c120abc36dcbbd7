"""Your own saga on the real stack: the trip app (examples/trip) as `compensa run --app`.

The same process that hosts the order saga hosts the trip saga, loaded by name: its
tables created by `compensa db upgrade --app`, its queues declared by `compensa topology
declare --app`, its trips started by `trip.requested` events from the ingest outbox (as an
upstream system writes them), inspected with `compensa saga show --app`, and watched by the
operator commands with `--app`: health, outbox status and the dead letters of its queues.
"""

from __future__ import annotations

import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import pytest
from sqlalchemy import insert

from examples.trip.app import app as trip_app
from examples.trip.contracts import TripRequested
from examples.trip.participants import CAR, FLIGHT, HOTEL
from infra.apps import app_queues, footprint, load_app
from infra.clock import SystemClock
from infra.simulation.scenario import START_OUTBOX, read_final_state
from outbox.uow import UnitOfWork
from sagas.app import Plan, PlannedSaga
from tests.e2e.support import Process, Stack, retry_delays, unique, wait_terminal
from tests.support import COMPENSA, compensa, contracts_of_apps_forgotten, eventually

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
TRIP = "examples.trip.app:app"


@pytest.fixture(autouse=True)
def _forget_app_contracts() -> Iterator[None]:
    with contracts_of_apps_forgotten():
        yield


@pytest.fixture
def trip_process(stack: Stack, tmp_path: Path) -> Iterator[Process]:
    """`compensa run --app examples.trip.app:app`: every trip service and the archive, one OS process."""
    log = tmp_path / "compensa-trip.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            [COMPENSA, "run", "--app", TRIP], env=stack.env(), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
    process = Process(popen, log)
    yield process
    if popen.poll() is None:
        popen.kill()
        popen.wait(timeout=10)


async def prepare(stack: Stack) -> None:
    """The trip app's tables and queues, by the CLI; its queues emptied of any earlier run's messages."""
    env = stack.env()
    upgraded = await compensa(env, "db", "upgrade", "--app", TRIP, "--json")
    assert upgraded.returncode == 0, upgraded.stderr
    assert "hotel_bookings" in upgraded.json()["app_tables"]
    declared = await compensa(env, "topology", "declare", "--app", TRIP, "--json")
    assert declared.returncode == 0, declared.stderr
    assert {q["name"] for q in declared.json()["queues"]} == {q.name for q in app_queues(trip_app)}
    for queue in app_queues(trip_app):
        for name in (*(queue.delay_queue(ms) for ms in retry_delays(stack.settings())), queue.name, queue.dlq):
            await (await stack.channel.get_queue(name, ensure=True)).purge()


async def request(stack: Stack, trips: list[TripRequested]) -> None:
    """Write the trips' `trip.requested` to the ingest outbox; the process's relay publishes them."""
    for trip in trips:
        async with UnitOfWork(stack.engine, START_OUTBOX, SystemClock()) as uow:
            uow.send(trip, correlation_id=trip.trip_id)
            await uow.commit()


async def test_trip_app_runs_as_a_process_and_compensates_a_trip_the_hotel_cannot_take(
    stack: Stack, trip_process: Process
) -> None:
    load_app(TRIP, str(ROOT))  # registers the trip contracts in this process too
    await prepare(stack)
    flight, car, hotel, full = unique("FL"), unique("CAR"), unique("HTL"), unique("HTL-FULL")
    inventory = {
        FLIGHT.tables.inventory: [{"resource_id": flight, "capacity": 10, "booked": 0}],
        CAR.tables.inventory: [{"resource_id": car, "capacity": 10, "booked": 0}],
        HOTEL.tables.inventory: [
            {"resource_id": hotel, "capacity": 10, "booked": 0},
            {"resource_id": full, "capacity": 0, "booked": 0},
        ],
    }
    async with stack.engine.begin() as connection:
        for table, rows in inventory.items():
            await connection.execute(insert(table), rows)

    async def consuming() -> bool:
        assert trip_process.popen.poll() is None, f"compensa exited:\n{trip_process.tail()}"
        for queue in app_queues(trip_app):
            assert await stack.consumer_count(queue.name) >= 1, f"nobody consumes {queue.name} yet"
        return True

    await eventually(consuming, timeout=30, interval=0.1, message="compensa run --app did not start consuming")

    trips = [
        TripRequested(
            trip_id=unique("trip"),
            traveller=f"traveller-{n}",
            flight=flight,
            car_location=car,
            hotel=full if n == 2 else hotel,
            nights=1 + n,
        )
        for n in range(5)
    ]
    await request(stack, trips)
    ids = [trip.trip_id for trip in trips]
    unlucky = ids[2]

    statuses = await wait_terminal(stack.engine, ids, timeout=30)

    assert statuses == {trip_id: "cancelled" if trip_id == unlucky else "completed" for trip_id in ids}
    plan = Plan(tuple(PlannedSaga(trip.trip_id, 0.0, trip) for trip in trips), {t.name: rows for t, rows in inventory.items()})
    final = await read_final_state(stack.engine, trip_app, plan)
    bookings = {
        resource.participant: {row["trip_id"]: row["status"] for row in final.rows(resource.tables.bookings)}
        for resource in (FLIGHT, CAR, HOTEL)
    }
    # The hotel was full: the flight and the car the trip had booked were cancelled.
    assert bookings["flights"][unlucky] == bookings["cars"][unlucky] == "cancelled"
    assert bookings["hotels"][unlucky] == "failed"
    booked = {row["resource_id"]: row["booked"] for r in (FLIGHT, CAR, HOTEL) for row in final.rows(r.tables.inventory)}
    assert booked == {flight: 4, car: 4, hotel: 4, full: 0}
    assert list(trip_app.simulation.invariants(final)) == []  # type: ignore[union-attr]

    shown = await compensa(stack.env(), "saga", "show", unlucky, "--app", TRIP, "--json")
    assert shown.returncode == 0, shown.stderr
    history = shown.json()["history"]
    assert [e["trigger"] for e in history][:4] == ["trip.requested", "flight.booked", "car.booked", "hotel.booking_failed"]
    sent = [kind for e in history for kind in (x["type"] for x in e["sent"])]
    assert {"car.cancel", "flight.cancel", "trip.cancelled"} <= set(sent)

    await operator_commands_watch_the_trip_app(stack)

    trip_process.popen.send_signal(signal.SIGTERM)

    async def exited() -> bool:
        return trip_process.popen.poll() is not None

    await eventually(exited, timeout=25, interval=0.05, message="compensa run --app did not exit on SIGTERM")
    assert trip_process.popen.returncode == 0, trip_process.tail()


async def operator_commands_watch_the_trip_app(stack: Stack) -> None:
    """`health`, `outbox status` and `dlq list` with --app see the trip's queues, outboxes and dead letters."""
    env = stack.env()
    hosted = footprint(trip_app)
    health = await compensa(env, "health", "--app", TRIP, "--json")
    assert health.returncode in (0, 1), health.stderr  # 1: unhealthy or degraded, still one report
    checks = health.json()["checks"]
    assert checks["broker"]["ok"], checks["broker"]  # every trip queue and DLQ declared on the real broker
    assert set(checks["broker"]["queues"]) == {name for q in hosted.queues for name in (q.name, q.dlq)}
    assert set(checks["dead_letters"]["queues"]) == set(hosted.queue_names)
    assert set(checks["relay"]["outboxes"]) == {"flights", "cars", "hotels", "saga", "ingest", "dlq"}
    assert "saga_starts" not in checks

    outboxes = await compensa(env, "outbox", "status", "--app", TRIP, "--json")
    assert outboxes.returncode == 0, outboxes.stderr
    assert [row["service"] for row in outboxes.json()] == list(hosted.outboxes)

    # A message no contract reads, sent to cars.commands: dead-lettered at once, archived by the
    # process hosting the trip app (it consumes the trip DLQs), and listed as the trip's.
    bad = unique("trip-bad")
    await stack.channel.default_exchange.publish(
        aio_pika.Message(b"not an envelope", message_id=str(uuid.uuid4()), correlation_id=bad), routing_key="cars.commands"
    )

    async def archived() -> list[dict[str, object]] | None:
        listed = await compensa(env, "dlq", "list", "--app", TRIP, "--queue", "cars.commands", "--saga", bad, "--json")
        assert listed.returncode == 0, listed.stderr
        return listed.json()["dead_letters"] or None

    letters = await eventually(archived, timeout=20, interval=0.2, message="the malformed car command was not archived")
    assert [(r["queue"], r["type"], r["reason_class"]) for r in letters] == [("cars.commands", "<undecodable>", "contract")]
