"""A deliberately broken trip app: its saga forgets to cancel the car.

When the hotel fails after the car was booked, the flight is cancelled but the car stays
booked for a trip that never happens. `compensa simulate --app examples.trip.broken:app
--swarm 50` finds it, shrinks it, prints the command that reproduces it and saves it to
compensa-regressions.json, which `--replay` runs (docs/tutorial.md; tests/sim/test_trip_app.py).
"""

from __future__ import annotations

from dataclasses import replace

from examples.trip.app import app as trip_app
from examples.trip.saga import CAR, FLIGHT, HOTEL, TRIP_SAGA

app = replace(trip_app, sagas=(replace(TRIP_SAGA, steps=(FLIGHT, replace(CAR, compensation=None), HOTEL)),))
