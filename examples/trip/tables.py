"""The tables the trip's participants own: per kind of resource, its inventory and its bookings.

They live in the app's own metadata; `compensa db upgrade --app examples.trip.app:app`
creates them, with each participant's outbox and inbox.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import CheckConstraint, Column, Index, Integer, MetaData, String, Table

from contracts.columns import UtcDateTime

metadata = MetaData()


@dataclass(frozen=True)
class ResourceTables:
    """`<kind>_inventory`: units per resource (a flight's seats); `<kind>_bookings`: one row per trip."""

    inventory: Table
    bookings: Table


def resource_tables(kind: str) -> ResourceTables:
    inventory = Table(
        f"{kind}_inventory",
        metadata,
        Column("resource_id", String(64), primary_key=True),
        Column("capacity", Integer, nullable=False),
        Column("booked", Integer, nullable=False, server_default="0"),
        CheckConstraint("booked >= 0 AND booked <= capacity", name=f"ck_{kind}_inventory_booked"),
    )
    bookings = Table(
        f"{kind}_bookings",
        metadata,
        Column("trip_id", String(64), primary_key=True),
        # NULL for a void: the trip was cancelled before anything was booked.
        Column("resource_id", String(64), nullable=True),
        Column("status", String(16), nullable=False),
        Column("updated_at", UtcDateTime(), nullable=False),
        Index(f"ix_{kind}_bookings_resource", "resource_id"),
    )
    return ResourceTables(inventory, bookings)


FLIGHTS = resource_tables("flight")
CARS = resource_tables("car")
HOTELS = resource_tables("hotel")
