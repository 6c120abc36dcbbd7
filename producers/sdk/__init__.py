"""The producer SDK: publish events into compensa from Python.

- In process, inside your own transaction: ``await publish(connection_or_session,
  payload, correlation_id=..., producer=...)`` adds the event to the ingest outbox
  with your business rows; your rollback drops it, your commit hands it to the relay.
- Over HTTP: ``AsyncIngestClient`` / ``IngestClient`` send to ``compensa api`` with
  retries, exponential backoff and one idempotency key per event, so a retried send
  never duplicates; 4xx answers raise a clear error.
"""

from producers.sdk.http import (
    Accepted,
    AsyncIngestClient,
    AuthenticationFailed,
    IdempotencyKeyReused,
    IngestClient,
    IngestError,
    IngestUnavailable,
    InvalidEvent,
    PermissionDenied,
    Rejected,
    RequestTooLarge,
    event,
)
from producers.sdk.outbox import publish, publish_many

__all__ = [
    "Accepted",
    "AsyncIngestClient",
    "AuthenticationFailed",
    "IdempotencyKeyReused",
    "IngestClient",
    "IngestError",
    "IngestUnavailable",
    "InvalidEvent",
    "PermissionDenied",
    "Rejected",
    "RequestTooLarge",
    "event",
    "publish",
    "publish_many",
]
