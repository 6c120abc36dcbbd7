"""What every part of the harness shares: service names, their settings, errors, `Server`."""

from __future__ import annotations

POSTGRES, RABBITMQ, REDIS = "postgres", "rabbitmq", "redis"
SERVICES = frozenset({POSTGRES, RABBITMQ, REDIS})
#: Not a session service (no URL to resolve): a test starts its own with `local_prometheus`.
PROMETHEUS = "prometheus"
ENV_URLS = {
    POSTGRES: "COMPENSA_TEST_DATABASE_URL",
    RABBITMQ: "COMPENSA_TEST_AMQP_URL",
    REDIS: "COMPENSA_TEST_REDIS_URL",
}
# The application's own settings, printed too by ``python -m`` so that a shell can run it.
APP_ENV_URLS = {
    POSTGRES: "COMPENSA_DATABASE_URL",
    RABBITMQ: "COMPENSA_AMQP_URL",
    REDIS: "COMPENSA_REDIS_URL",
}
#: RabbitMQ's management API (HTTP), for the tests and for the application.
MANAGEMENT_ENV_URL = "COMPENSA_TEST_AMQP_MANAGEMENT_URL"
APP_MANAGEMENT_ENV_URL = "COMPENSA_AMQP_MANAGEMENT_URL"

#: Queue statistics every second, kept at one-second granularity, instead of every 5 s:
#: `compensa health` judges a queue wedged from them, and the tests wait for that. And
#: bodies past 2 MiB refused by the broker, as compose.yaml does.
RABBITMQ_STATS_CONF = (
    "max_message_size = 2097152\n"
    "collect_statistics_interval = 1000\n"
    "management.sample_retention_policies.global.minute = 1\n"
    "management.sample_retention_policies.basic.minute = 1\n"
    "management.sample_retention_policies.detailed.10 = 1\n"
)


class HarnessError(RuntimeError):
    """A server could not be installed, started or stopped."""


class NotControllable(HarnessError):
    """The server was not started by this harness, so it cannot be stopped on demand."""


class Server:
    """A server the session uses: its URL, where it came from, and how to release it.

    Only servers the harness started from local binaries are ``controllable``: tests can
    ``stop()`` and ``start()`` them again (on the same port) to exercise outages.
    """

    controllable = False

    def __init__(self, name: str, origin: str, url: str = "") -> None:
        self.name = name
        self.origin = origin
        self.url = url
        #: RabbitMQ only: its management API, ``http://user:password@host:port/``.
        self.management_url = ""
        self.startup_seconds = 0.0

    @property
    def running(self) -> bool:
        return True

    def _not_controllable(self) -> NotControllable:
        return NotControllable(
            f"{self.name} at {self.url} comes from {self.origin}; only a server the harness "
            "started from local binaries can be stopped and restarted"
        )

    def stop(self) -> None:
        raise self._not_controllable()

    def start(self) -> None:
        raise self._not_controllable()

    def close(self) -> None:
        """Release the server at the end of the session."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.origin} {self.url}>"
