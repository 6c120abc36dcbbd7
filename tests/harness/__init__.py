"""Real-server test harness: PostgreSQL, RabbitMQ and Redis for integration tests.

The API lives in the :mod:`tests.harness.servers` package; ``python -m
tests.harness.servers`` keeps a set of servers running for a shell session.
"""
