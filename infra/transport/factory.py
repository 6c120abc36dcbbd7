"""Pick the transport from settings: RabbitMQ when a URL is set, else in-memory."""

from __future__ import annotations

from collections.abc import Sequence

from infra.clock import SystemClock
from infra.settings import Settings
from infra.topology import WORK_QUEUES, QueueSpec, retry_delays_ms
from infra.transport.base import Transport


async def transport_from_settings(settings: Settings, queues: Sequence[QueueSpec] = WORK_QUEUES) -> Transport:
    """The transport of the settings, declaring (and, in memory, holding) `queues`: the hosted app's."""
    if settings.amqp_url:
        from infra.transport.rabbit import RabbitTransport

        transport = RabbitTransport(
            settings.amqp_url,
            queue_type=settings.queue_type,
            retry_delays_ms=retry_delays_ms(settings.max_attempts, settings.retry_base_seconds, settings.retry_max_seconds),
            queues=queues,
        )
        return await transport.connect()
    from infra.transport.memory import MemoryBroker

    return MemoryBroker(SystemClock(), queues=queues)
