"""Gauges read from the database now and then: what a process can only know by asking."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncEngine

from infra.telemetry import instruments
from outbox.uow import pending_summary
from sagas.definition import SagaDefinition
from sagas.store import ACTIVE_STATUSES, count_active


async def sample_outboxes(engine: AsyncEngine, services: Sequence[str], now: datetime) -> None:
    for service in services:
        summary = await pending_summary(engine, service, now)
        instruments.outbox_pending.set(summary["pending"], {"service": service})
        instruments.outbox_oldest_age.set(summary["oldest_pending_age_seconds"], {"service": service})


async def sample_sagas(engine: AsyncEngine, definitions: Sequence[SagaDefinition]) -> None:
    async with engine.connect() as connection:
        counts = await count_active(connection)
    for definition in definitions:
        for status in ACTIVE_STATUSES:
            labels = {"saga_type": definition.name, "status": status.value}
            instruments.sagas_active.set(counts.get((definition.name, status.value), 0), labels)


async def sample_dead_letters(engine: AsyncEngine, queues: Sequence[str]) -> None:
    from infra.dlq.query import open_counts

    async with engine.connect() as connection:
        counts = await open_counts(connection)
    # Every known queue, zeros included, so an alert sees the count fall back to 0.
    for queue in queues:
        instruments.dead_letters_new.set(counts.get(queue, 0), {"queue": queue})
