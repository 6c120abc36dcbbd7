"""HTTP ingest for upstream systems: validated events into the ingest outbox, exactly once per key."""

from producers.ingest.app import create_app
from producers.ingest.auth import ApiKey, Producer, ProducerDirectory, ProducerStore, generate_key
from producers.ingest.config import IngestConfig

__all__ = [
    "ApiKey", "IngestConfig", "Producer", "ProducerDirectory", "ProducerStore", "create_app", "generate_key",
]
