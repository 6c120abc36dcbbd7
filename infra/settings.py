"""Settings from `COMPENSA_*` environment variables, with the embedded default."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

EMBEDDED_DATABASE_URL = "sqlite+aiosqlite:///.compensa/compensa.db"
ENV_PREFIX = "COMPENSA_"
#: Settings whose value is never echoed in an error, not even redacted.
SECRET_SETTINGS = frozenset({"console_secret"})


class SettingsError(ValueError):
    """A `COMPENSA_*` variable holds a value the settings refuse; the message names it and what is expected."""

    @classmethod
    def from_validation(cls, exc: ValidationError) -> SettingsError:
        """One line per refused variable, joined: `COMPENSA_PREFETCH='abc': input should be a valid integer`."""
        from infra.logging import redact

        problems = []
        for error in exc.errors(include_url=False):
            field = str(error["loc"][0]) if error["loc"] else ""
            variable = ENV_PREFIX + field.upper()
            # A secret is never shown, a URL's password never reaches the terminal.
            shown = " (value hidden)" if field in SECRET_SETTINGS else "=" + repr(redact(str(error.get("input", ""))))
            reason = error["msg"].removeprefix("Value error, ")
            problems.append(f"{variable}{shown}: {reason[:1].lower()}{reason[1:]}")
        return cls("; ".join(problems) or str(exc).splitlines()[0])


def check_database_url(url: str) -> str:
    """`url` when SQLAlchemy parses it and it names a backend compensa runs on; else a ValueError that does not quote it."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    expected = "expected sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER@HOST:PORT/DATABASE"
    try:
        backend = make_url(url).get_backend_name()
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise ValueError(f"not a database URL; {expected}") from None
    if backend not in ("sqlite", "postgresql"):
        raise ValueError(f"unsupported database {backend!r}; {expected}")
    return url


def derive_management_url(amqp_url: str) -> str:
    """RabbitMQ's management API beside an AMQP URL: same host and credentials, port 15672.

    `amqps://` gives `https://…:15671/`; no credentials gives RabbitMQ's default guest.
    """
    parts = urlsplit(amqp_url)
    secure = parts.scheme.lower() == "amqps"
    userinfo = parts.netloc.rpartition("@")[0] or "guest:guest"
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if secure else 'http'}://{userinfo}@{host}:{15671 if secure else 15672}/"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    database_url: str = Field(
        default=EMBEDDED_DATABASE_URL,
        description="SQLAlchemy async URL: sqlite+aiosqlite:///… or postgresql+asyncpg://…",
    )
    amqp_url: str | None = Field(default=None, description="RabbitMQ URL; unset = in-memory transport.")
    amqp_management_url: str | None = Field(
        default=None,
        description="RabbitMQ management API (http://user:password@host:15672/), where `compensa health` reads "
        "queue statistics; unset = derived from COMPENSA_AMQP_URL (same host and credentials, port 15672).",
    )
    redis_url: str | None = None

    declare_topology: bool = Field(
        default=True,
        description=(
            "Declare exchanges and queues when a service starts; "
            "off for least-privilege users (the admin runs `compensa topology declare`)."
        ),
    )
    queue_type: Literal["classic", "quorum"] = "classic"
    prefetch: int = Field(default=32, ge=1, le=10_000)
    consumer_batch_size: int = Field(
        default=50,
        ge=1,
        le=1_000,
        description="Deliveries applied in one transaction when they arrive together (1 = one at a time).",
    )
    consumer_workers: int = Field(default=4, ge=1, le=64, description="Concurrent transactions per consumer.")
    max_attempts: int = Field(default=5, ge=1, le=50, description="Deliveries before the DLQ.")
    retry_base_seconds: float = Field(default=0.5, gt=0)
    retry_max_seconds: float = Field(default=60.0, gt=0)
    unavailable_retry_seconds: float = Field(
        default=120.0,
        ge=0,
        le=86_400,
        description=(
            "How long a message waits, unacknowledged, for an unavailable database (a restart) before the ordinary retries."
        ),
    )

    dispatch_after_commit: bool = Field(
        default=True,
        description="A service publishes the messages it committed itself, at once; the relay sweeps what it missed.",
    )
    dispatch_lease_seconds: float = Field(
        default=10.0,
        gt=0,
        description="How long the relay leaves a row to the process that committed it before publishing it itself.",
    )
    relay_batch_size: int = Field(default=200, ge=1, le=10_000)
    relay_poll_seconds: float = Field(default=0.5, gt=0)
    relay_retry_base_seconds: float = Field(
        default=0.5, gt=0, le=60, description="First wait after a failed relay batch; doubles, with jitter, while failing."
    )
    relay_retry_max_seconds: float = Field(
        default=10.0, gt=0, le=600, description="Longest wait between failed relay batches (wake-ups do not shorten it)."
    )
    outbox_retention_hours: float = Field(default=72.0, gt=0)
    inbox_retention_hours: float = Field(default=168.0, gt=0)

    deadline_sweep_seconds: float = Field(default=0.5, gt=0)
    saga_step_deadline_seconds: float = Field(default=30.0, gt=0, description="How long a saga waits for a step's reply.")
    saga_compensation_deadline_seconds: float = Field(default=30.0, gt=0)
    saga_max_compensation_attempts: int = Field(default=5, ge=1, le=100)
    saga_max_in_flight: int = Field(
        default=100,
        ge=1,
        le=1_000_000,
        description="Sagas running or compensating at once; further starts wait, un-started, in saga.starts.",
    )
    reservation_ttl_seconds: float = Field(default=900.0, gt=0, description="Stock reservations expire after this.")
    payment_amount_limit: int = Field(default=500_000, ge=0, description="The default gateway declines above this (minor units).")
    payment_breaker_enabled: bool = Field(
        default=True, description="Guard the payment gateway with a circuit breaker (off: every charge calls the gateway)."
    )
    payment_breaker_failures: int = Field(
        default=5, ge=1, le=1_000, description="Transient gateway failures in a row that open the payment circuit breaker."
    )
    payment_breaker_cool_down_seconds: float = Field(
        default=5.0,
        gt=0,
        le=3_600,
        description="How long the open breaker refuses charges and refunds before one probe may call the gateway "
        "(refused messages wait for it in the delay queues without using an attempt).",
    )
    shutdown_grace_seconds: float = Field(default=20.0, gt=0)
    health_stuck_seconds: float = Field(
        default=60.0,
        gt=0,
        le=86_400,
        description="`compensa health`: how long an order may wait for its saga, a saga deadline stay unfired, "
        "or a queue hold unacknowledged messages without an ack, before it counts as stuck.",
    )

    # HTTP ingest (`compensa api`); see producers/ingest.
    api_host: str = Field(default="127.0.0.1", description="Address `compensa api` listens on.")
    api_port: int = Field(default=8080, ge=1, le=65535)
    api_keys_file: Path | None = Field(
        default=None, description="JSON file of API keys (hashed), besides the ingest_producers table."
    )
    api_key_cache_seconds: float = Field(
        default=5.0, ge=0, description="API key lookups are cached this long; a revocation takes effect within it."
    )
    api_idempotency_ttl_seconds: float = Field(
        default=86_400.0, gt=0, description="How long a stored response answers retries of its Idempotency-Key."
    )
    api_idempotency_processing_seconds: float = Field(
        default=30.0, gt=0, description="How long a `processing` marker outlives a crashed request."
    )
    api_rate_limit: int = Field(default=600, ge=1, description="Requests per producer per window (a producer may have its own).")
    api_rate_limit_window_seconds: float = Field(default=60.0, gt=0)
    api_max_request_bytes: int = Field(default=1_048_576, ge=1024)
    api_max_batch_events: int = Field(default=500, ge=1, le=10_000)
    api_require_idempotency_key: bool = False
    api_body_timeout_seconds: float = Field(
        default=10.0, gt=0, le=600, description="A request body not received within this is answered 408."
    )
    api_redis_timeout_seconds: float = Field(
        default=1.0, gt=0, description="Redis socket timeout; past it a request answers 503."
    )

    # The operator console (`compensa console`); see infra/console.
    console_host: str = Field(default="127.0.0.1", description="Address `compensa console` listens on.")
    console_port: int = Field(default=8090, ge=1, le=65535, description="Port of the operator console.")
    console_secret: str | None = Field(
        default=None,
        min_length=32,
        description="Key that signs console sessions (at least 32 characters); unset: a random one per process, "
        "so a restart signs everybody out.",
    )
    console_session_seconds: float = Field(
        default=28_800.0, gt=0, le=30 * 86_400, description="A console sign-in lasts this long, then asks again."
    )
    operator: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="Who the audit trail names for CLI actions; unset: the OS user.",
    )

    log_level: str = "INFO"
    log_format: Literal["json", "console"] = "json"
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        default="auto",
        description="The event loop of CLI commands and services: uvloop (auto: when installed) or asyncio's own.",
    )

    #: Serve Prometheus metrics at http://<metrics_host>:<metrics_port>/metrics (`--metrics-port`).
    metrics_port: int | None = Field(default=None, ge=1, le=65535, description="Port of /metrics; unset: not served.")
    metrics_host: str = Field(default="0.0.0.0", description="Address /metrics listens on.")  # noqa: S104
    metrics_sample_seconds: float = Field(
        default=15.0, gt=0, description="How often gauges read from the database (outbox lag, sagas, dead letters) are sampled."
    )

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        return check_database_url(value)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings from the environment; a refused value raises `SettingsError` naming its variable."""
    try:
        return Settings()
    except ValidationError as exc:
        raise SettingsError.from_validation(exc) from None
