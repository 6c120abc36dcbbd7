"""Real-server test harness: PostgreSQL, RabbitMQ and Redis for integration tests.

The API lives in :mod:`tests.harness.servers`; it is not re-exported here so that
``python -m tests.harness.servers`` runs without a double-import warning.
"""
