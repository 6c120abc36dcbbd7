"""The trip booking application: `compensa simulate|run|saga --app examples.trip.app:app`."""

from __future__ import annotations

from examples.trip.contracts import MESSAGES, TripCancelled, TripConfirmed, TripRejected
from examples.trip.participants import PARTICIPANTS
from examples.trip.saga import TRIP_SAGA
from examples.trip.simulation import PIECES
from sagas.app import SagaApp

app = SagaApp(
    name="trip",
    description="book flight -> car -> hotel; cancel what was booked when a later booking fails",
    sagas=(TRIP_SAGA,),
    messages=MESSAGES,
    participants=PARTICIPANTS,
    simulation=PIECES,
    # Its own saga queues, so it can share a broker with the order app.
    saga_events_queue="trip.saga.events",
    saga_starts_queue="trip.saga.starts",
    outcomes=(TripConfirmed, TripCancelled, TripRejected),
)
