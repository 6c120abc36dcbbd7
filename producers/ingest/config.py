"""What the ingest app is told by its composition root (infra builds it from settings)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class IngestConfig:
    #: How long a stored response answers retries of the same Idempotency-Key.
    idempotency_ttl_seconds: float = 86_400.0
    #: How long a `processing` marker lives if its request never finishes (a crash).
    processing_ttl_seconds: float = 30.0
    #: Requests per producer in any window of `rate_window_seconds` (a sliding window),
    #: unless the producer has its own limit. `RateLimit-Policy` gives the window in
    #: whole seconds (rounded up).
    rate_limit: int = 600
    rate_window_seconds: float = 60.0
    max_request_bytes: int = 1_048_576
    #: How long a client may take to send its whole body (a slow sender holds a connection).
    body_timeout_seconds: float = 10.0
    #: Deepest nesting of arrays and objects a body may have (an order.created batch needs 6).
    max_json_depth: int = 32
    max_batch_events: int = 500
    #: How long an API key lookup is cached; a revocation takes effect within this.
    key_cache_seconds: float = 5.0
    #: Refuse a POST without an Idempotency-Key (400, as the IETF draft says).
    require_idempotency_key: bool = False
    #: Prefix of every Redis key the app writes (idempotency records, rate logs).
    redis_prefix: str = "compensa:ingest:"
    #: The outbox accepted events are written to.
    outbox: str = "ingest"
    #: How long one readiness check answers GET /readyz (concurrent probes share it).
    health_cache_seconds: float = 1.0
