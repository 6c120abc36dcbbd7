"""HTTP ingest for upstream systems: validated events into the ingest outbox, exactly once per key."""

from typing import Any

from producers.ingest.auth import ApiKey, Producer, ProducerDirectory, ProducerStore, generate_key
from producers.ingest.config import IngestConfig

__all__ = [
    "ApiKey",
    "IngestConfig",
    "Producer",
    "ProducerDirectory",
    "ProducerStore",
    "create_app",
    "generate_key",
]


def __getattr__(name: str) -> Any:
    # The FastAPI app is imported on first use: the schema, the CLI and the simulator
    # import this package for its tables and need not pay for the web stack.
    if name == "create_app":
        from producers.ingest.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
