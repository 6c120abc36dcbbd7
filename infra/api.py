"""The HTTP ingest app built from settings: the composition of `producers.ingest` with
the configured database, Redis and keys (`compensa api` serves it).

The app itself lives in `producers.ingest`; building it from settings is the entry
points' job, so it lives here, in infra.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from infra.settings import Settings, get_settings
from infra.telemetry.http import RequestTelemetry


def ingest_config(settings: Settings) -> Any:
    from producers.ingest import IngestConfig

    return IngestConfig(
        idempotency_ttl_seconds=settings.api_idempotency_ttl_seconds,
        processing_ttl_seconds=settings.api_idempotency_processing_seconds,
        rate_limit=settings.api_rate_limit,
        rate_window_seconds=settings.api_rate_limit_window_seconds,
        max_request_bytes=settings.api_max_request_bytes,
        body_timeout_seconds=settings.api_body_timeout_seconds,
        max_batch_events=settings.api_max_batch_events,
        key_cache_seconds=settings.api_key_cache_seconds,
        require_idempotency_key=settings.api_require_idempotency_key,
    )


def build_app(settings: Settings | None = None) -> Any:
    """The ingest app on the configured database and Redis (both opened lazily, closed on shutdown)."""
    from redis.asyncio import Redis

    from infra.clock import SystemClock
    from infra.db import create_engine
    from producers.ingest import ProducerDirectory, ProducerStore, create_app
    from producers.ingest.auth import load_keys_file

    settings = settings or get_settings()
    if not settings.redis_url:
        raise ValueError("the ingest API needs Redis for idempotency keys and rate limits: set COMPENSA_REDIS_URL")
    engine = create_engine(settings.database_url, pre_ping=True)
    redis = Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.api_redis_timeout_seconds,
        socket_connect_timeout=settings.api_redis_timeout_seconds,
    )
    configured = load_keys_file(settings.api_keys_file) if settings.api_keys_file else []
    directory = ProducerDirectory(ProducerStore(engine), configured, cache_seconds=settings.api_key_cache_seconds)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await redis.aclose()
            await engine.dispose()

    app = create_app(
        engine=engine,
        redis=redis,
        producers=directory,
        config=ingest_config(settings),
        clock=SystemClock(),
        lifespan=lifespan,
    )
    app.add_middleware(RequestTelemetry)
    return app


def app_from_environment() -> Any:
    """uvicorn factory: `uvicorn --factory infra.api:app_from_environment`."""
    from infra.logging import configure_logging
    from infra.telemetry.setup import configure_telemetry

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    configure_telemetry("compensa-api", metrics_port=settings.metrics_port, metrics_host=settings.metrics_host)
    return build_app(settings)
