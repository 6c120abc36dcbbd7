"""The trip's participants: flights, cars and hotels, one handler per command each.

A handler reads the trip's booking and the resource's inventory, lets the pure rules
(rules.py) decide, writes the decision and stages the reply on the unit of work: the
rows, the reply (outbox) and the inbox record commit together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from contracts import Message, Payload
from examples.trip import contracts as c
from examples.trip.rules import Booking, BookingStatus, Decision, decide_book, decide_cancel
from examples.trip.tables import CARS, FLIGHTS, HOTELS, ResourceTables
from outbox.uow import Handler, UnitOfWork
from sagas.app import Participant


@dataclass(frozen=True)
class Resource:
    """One kind of bookable resource: its tables, its commands, and the replies it sends."""

    participant: str
    tables: ResourceTables
    book: type[c.TripPayload]
    cancel: type[c.TripPayload]
    #: The field of the book command (and of the booked reply) that names the resource.
    field: str
    #: The reply classes, called with the reply's fields.
    booked: Callable[..., Payload]
    failed: Callable[..., Payload]
    cancelled: Callable[..., Payload]

    def book_reply(self, trip_id: str, resource_id: str, decision: Decision) -> Payload:
        if decision.reply == "booked":
            return self.booked(trip_id=trip_id, **{self.field: resource_id})
        return self.failed(trip_id=trip_id, reason=decision.reason)


FLIGHT = Resource(
    "flights", FLIGHTS, c.BookFlight, c.CancelFlight, "flight", c.FlightBooked, c.FlightBookingFailed, c.FlightCancelled
)
CAR = Resource("cars", CARS, c.BookCar, c.CancelCar, "location", c.CarBooked, c.CarBookingFailed, c.CarCancelled)
HOTEL = Resource("hotels", HOTELS, c.BookHotel, c.CancelHotel, "hotel", c.HotelBooked, c.HotelBookingFailed, c.HotelCancelled)


class BookingStore:
    """A resource's bookings and inventory, over the unit of work's connection."""

    def __init__(self, connection: AsyncConnection, tables: ResourceTables) -> None:
        self.connection = connection
        self.tables = tables

    async def booking(self, trip_id: str) -> Booking | None:
        b = self.tables.bookings
        row = (await self.connection.execute(select(b).where(b.c.trip_id == trip_id).with_for_update())).first()
        return None if row is None else Booking(row.trip_id, row.resource_id, BookingStatus(row.status))

    async def free(self, resource_id: str) -> int | None:
        """Units of `resource_id` not booked, its row locked until commit (None: no such resource)."""
        i = self.tables.inventory
        row = (await self.connection.execute(select(i).where(i.c.resource_id == resource_id).with_for_update())).first()
        return None if row is None else int(row.capacity) - int(row.booked)

    async def record(self, existing: Booking | None, decision: Decision, now: Any) -> None:
        booking = decision.booking
        if booking is not None:
            values = {"resource_id": booking.resource_id, "status": booking.status.value, "updated_at": now}
            b = self.tables.bookings
            if existing is None:
                await self.connection.execute(insert(b).values(trip_id=booking.trip_id, **values))
            else:
                await self.connection.execute(update(b).where(b.c.trip_id == booking.trip_id).values(**values))
        if decision.units:
            assert booking is not None and booking.resource_id is not None
            i = self.tables.inventory
            await self.connection.execute(
                update(i).where(i.c.resource_id == booking.resource_id).values(booked=i.c.booked + decision.units)
            )


async def handle_book(uow: UnitOfWork, message: Message[Any], *, resource: Resource) -> None:
    """Book one unit for the trip, once; a repeated command gets the first answer again."""
    command = message.payload
    resource_id = getattr(command, resource.field)
    store = BookingStore(uow.connection, resource.tables)
    existing = await store.booking(command.trip_id)
    free = None if existing is not None else await store.free(resource_id)
    decision = decide_book(existing, command.trip_id, resource_id, free=free)
    await store.record(existing, decision, uow.now())
    uow.send(resource.book_reply(command.trip_id, resource_id, decision))


async def handle_cancel(uow: UnitOfWork, message: Message[Any], *, resource: Resource) -> None:
    """Cancel the trip's booking and free its unit; confirm even when there was nothing to cancel."""
    trip_id = message.payload.trip_id
    store = BookingStore(uow.connection, resource.tables)
    existing = await store.booking(trip_id)
    decision = decide_cancel(existing, trip_id)
    await store.record(existing, decision, uow.now())
    uow.send(resource.cancelled(trip_id=trip_id))


def handlers(resource: Resource) -> dict[str, Handler]:
    """The resource's handlers keyed by command type: one per message."""
    return {
        resource.book.message_type: partial(handle_book, resource=resource),
        resource.cancel.message_type: partial(handle_cancel, resource=resource),
    }


def participant(resource: Resource) -> Participant:
    return Participant(
        name=resource.participant,
        queue=f"{resource.participant}.commands",
        handlers=handlers(resource),
        tables=(resource.tables.inventory, resource.tables.bookings),
    )


PARTICIPANTS = (participant(FLIGHT), participant(CAR), participant(HOTEL))
