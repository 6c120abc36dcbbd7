"""The trip saga's messages: one start event, three book commands with their replies, three
cancel compensations with their confirmations, and the trip's outcomes.

Every message names its trip: the envelope's correlation id must equal `trip_id`
(`saga_key`), so a message can only act on its own trip.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from contracts.messages import Identifier, Payload, StrictInt, Text


class TripPayload(Payload):
    """A message of one trip's saga: its correlation id is the trip id."""

    saga_key: ClassVar[str | None] = "trip_id"

    trip_id: Identifier


# ---------------------------------------------------------------- the start and the outcomes


class TripRequested(TripPayload):
    message_type = "trip.requested"
    kind = "event"

    traveller: Identifier
    flight: Identifier
    car_location: Identifier
    hotel: Identifier
    nights: StrictInt = Field(ge=1, le=30)


class TripConfirmed(TripPayload):
    message_type = "trip.confirmed"
    kind = "event"


class TripCancelled(TripPayload):
    message_type = "trip.cancelled"
    kind = "event"

    reason: Text


class TripRejected(TripPayload):
    message_type = "trip.rejected"
    kind = "event"

    reason: Text


# ---------------------------------------------------------------- flights


class BookFlight(TripPayload):
    message_type = "flight.book"
    kind = "command"

    flight: Identifier


class FlightBooked(TripPayload):
    message_type = "flight.booked"
    kind = "event"

    flight: Identifier


class FlightBookingFailed(TripPayload):
    message_type = "flight.booking_failed"
    kind = "event"

    reason: Text


class CancelFlight(TripPayload):
    message_type = "flight.cancel"
    kind = "command"


class FlightCancelled(TripPayload):
    message_type = "flight.cancelled"
    kind = "event"


# ---------------------------------------------------------------- cars


class BookCar(TripPayload):
    message_type = "car.book"
    kind = "command"

    location: Identifier


class CarBooked(TripPayload):
    message_type = "car.booked"
    kind = "event"

    location: Identifier


class CarBookingFailed(TripPayload):
    message_type = "car.booking_failed"
    kind = "event"

    reason: Text


class CancelCar(TripPayload):
    message_type = "car.cancel"
    kind = "command"


class CarCancelled(TripPayload):
    message_type = "car.cancelled"
    kind = "event"


# ---------------------------------------------------------------- hotels


class BookHotel(TripPayload):
    message_type = "hotel.book"
    kind = "command"

    hotel: Identifier
    nights: StrictInt = Field(ge=1, le=30)


class HotelBooked(TripPayload):
    message_type = "hotel.booked"
    kind = "event"

    hotel: Identifier


class HotelBookingFailed(TripPayload):
    message_type = "hotel.booking_failed"
    kind = "event"

    reason: Text


class CancelHotel(TripPayload):
    message_type = "hotel.cancel"
    kind = "command"


class HotelCancelled(TripPayload):
    message_type = "hotel.cancelled"
    kind = "event"


MESSAGES: tuple[type[Payload], ...] = (
    TripRequested,
    TripConfirmed,
    TripCancelled,
    TripRejected,
    BookFlight,
    FlightBooked,
    FlightBookingFailed,
    CancelFlight,
    FlightCancelled,
    BookCar,
    CarBooked,
    CarBookingFailed,
    CancelCar,
    CarCancelled,
    BookHotel,
    HotelBooked,
    HotelBookingFailed,
    CancelHotel,
    HotelCancelled,
)
