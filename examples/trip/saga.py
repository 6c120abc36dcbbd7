"""The trip saga, as data: book the flight, then the car, then the hotel; cancel what was booked
when a later booking fails or times out.

```
trip.requested ─► flight.book ─► flight.booked ─► car.book ─► car.booked ─► hotel.book ─► hotel.booked ─► trip.confirmed
flight.booking_failed                       ─► trip.rejected                        (nothing to undo)
car.booking_failed / car deadline           ─► flight.cancel ─► trip.cancelled
hotel.booking_failed / hotel deadline       ─► car.cancel + flight.cancel ─► trip.cancelled
```
"""

from __future__ import annotations

from datetime import timedelta

from contracts.messages import Payload, clip_text
from examples.trip.contracts import (
    BookCar,
    BookFlight,
    BookHotel,
    CancelCar,
    CancelFlight,
    CancelHotel,
    CarBooked,
    CarBookingFailed,
    CarCancelled,
    FlightBooked,
    FlightBookingFailed,
    FlightCancelled,
    HotelBooked,
    HotelBookingFailed,
    HotelCancelled,
    TripCancelled,
    TripConfirmed,
    TripRejected,
    TripRequested,
)
from sagas.definition import Compensation, SagaData, SagaDefinition, Step

STEP_DEADLINE = timedelta(seconds=30)


def _initial_data(request: Payload) -> SagaData:
    assert isinstance(request, TripRequested)
    return request.model_dump(mode="json")


# A cancellation carries only the trip id: the participant finds the booking by it, and a
# step that timed out must be cancellable without ever having seen its reply.
CANCEL_FLIGHT = Compensation(CancelFlight, lambda data: CancelFlight(trip_id=data["trip_id"]), FlightCancelled)
CANCEL_CAR = Compensation(CancelCar, lambda data: CancelCar(trip_id=data["trip_id"]), CarCancelled)
CANCEL_HOTEL = Compensation(CancelHotel, lambda data: CancelHotel(trip_id=data["trip_id"]), HotelCancelled)

FLIGHT = Step(
    name="flight",
    command=BookFlight,
    build=lambda data: BookFlight(trip_id=data["trip_id"], flight=data["flight"]),
    success=FlightBooked,
    failures=(FlightBookingFailed,),
    deadline=STEP_DEADLINE,
    compensation=CANCEL_FLIGHT,
)
CAR = Step(
    name="car",
    command=BookCar,
    build=lambda data: BookCar(trip_id=data["trip_id"], location=data["car_location"]),
    success=CarBooked,
    failures=(CarBookingFailed,),
    deadline=STEP_DEADLINE,
    compensation=CANCEL_CAR,
)
HOTEL = Step(
    name="hotel",
    command=BookHotel,
    build=lambda data: BookHotel(trip_id=data["trip_id"], hotel=data["hotel"], nights=data["nights"]),
    success=HotelBooked,
    failures=(HotelBookingFailed,),
    deadline=STEP_DEADLINE,
    compensation=CANCEL_HOTEL,
)

TRIP_SAGA = SagaDefinition(
    name="trip",
    starts_with=TripRequested,
    initial_data=_initial_data,
    steps=(FLIGHT, CAR, HOTEL),
    completed=lambda data: TripConfirmed(trip_id=data["trip_id"]),
    cancelled=lambda data, reason: TripCancelled(trip_id=data["trip_id"], reason=clip_text(reason)),
    rejected=lambda data, reason: TripRejected(trip_id=data["trip_id"], reason=clip_text(reason)),
    compensation_deadline=timedelta(seconds=30),
    max_compensation_attempts=5,
)
