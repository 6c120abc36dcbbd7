"""Least-privilege RabbitMQ users: each compensa role may publish only what it owns.

Derived from the topology (`infra/topology.py`), never written by hand:

- the **relay** publishes every outbox: events, commands, and replays addressed to one
  queue; it reads nothing and declares nothing;
- each **consumer service** reads its own work queues and publishes only its retries
  (to its delay queues through the default exchange) and its dead letters (to the DLX);
- the **archive** (`dlq`) reads the dead-letter queues and publishes nothing (a replay
  goes through its outbox and the relay);
- an **upstream producer** on raw AMQP may publish, on the events exchange, only the
  event types it is given (RabbitMQ topic permissions check the routing key);
- the **admin** user declares the topology and runs migrations and the CLI.

So nothing but the relay (which publishes what the services committed) can send a
command: a publisher that is not compensa cannot make payments charge or the ledger
post. What remains open: the default exchange lets a consumer service publish to any
queue by name; a dedicated retry exchange would close that.

`definitions()` gives RabbitMQ's definitions document (import it with
`rabbitmqctl import_definitions`, the management API, or `load_definitions` at boot);
`apply()` puts the same users and permissions through the management HTTP API.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from infra import topology as t

NOTHING = "^$"
DEFAULT_EXCHANGE = "amq.default"


def _any_of(names: Sequence[str]) -> str:
    return "^(" + "|".join(re.escape(name) for name in names) + ")$" if names else NOTHING


@dataclass(frozen=True)
class Grant:
    """One user's permissions in the vhost (regular expressions over resource names)."""

    user: str
    configure: str = NOTHING
    write: str = NOTHING
    read: str = NOTHING
    #: exchange -> routing keys the user may publish with (topic exchanges only).
    topic_write: Mapping[str, str] = field(default_factory=dict)
    tags: str = ""


def service_grant(service: str, user: str | None = None) -> Grant:
    """A consumer service: read its queues, publish its retries and dead letters."""
    queues = [q for q in t.WORK_QUEUES if q.service == service]
    if not queues:
        raise ValueError(f"no work queue belongs to {service!r}")
    return Grant(
        user=user or f"compensa-{service}",
        read=_any_of([q.name for q in queues]),
        write=_any_of([DEFAULT_EXCHANGE, t.DLX.name]),
    )


def relay_grant(user: str = "compensa-relay") -> Grant:
    return Grant(
        user=user,
        write=_any_of([t.EVENTS.name, t.COMMANDS.name, DEFAULT_EXCHANGE]),
        topic_write={t.EVENTS.name: ".*"},
    )


def archive_grant(user: str = "compensa-dlq") -> Grant:
    return Grant(user=user, read=_any_of([q.name for q in t.DEAD_LETTER_QUEUES]))


def upstream_grant(user: str, event_types: Sequence[str]) -> Grant:
    """An upstream system publishing events straight to RabbitMQ: only `event_types`."""
    return Grant(
        user=user,
        write=_any_of([t.EVENTS.name]),
        topic_write={t.EVENTS.name: _any_of(list(event_types))},
    )


def admin_grant(user: str = "compensa-admin") -> Grant:
    return Grant(user=user, configure=".*", write=".*", read=".*", tags="administrator")


def compensa_grants() -> list[Grant]:
    """The users a compensa deployment runs with: admin, relay, archive, one per service."""
    services = sorted({q.service for q in t.WORK_QUEUES})
    return [admin_grant(), relay_grant(), archive_grant(), *(service_grant(s) for s in services)]


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's `rabbit_password_hashing_sha256`: base64(salt + sha256(salt + password))."""
    salt = salt if salt is not None else os.urandom(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def definitions(grants: Sequence[Grant], passwords: Mapping[str, str], vhost: str = "/") -> dict[str, Any]:
    """RabbitMQ definitions (users, permissions, topic permissions) for `grants`."""
    missing = sorted(g.user for g in grants if g.user not in passwords)
    if missing:
        raise ValueError(f"no password for {', '.join(missing)}")
    return {
        "users": [
            {
                "name": g.user,
                "password_hash": password_hash(passwords[g.user]),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": g.tags,
            }
            for g in grants
        ],
        "permissions": [
            {"user": g.user, "vhost": vhost, "configure": g.configure, "write": g.write, "read": g.read} for g in grants
        ],
        "topic_permissions": [
            {"user": g.user, "vhost": vhost, "exchange": exchange, "write": keys, "read": ".*"}
            for g in grants
            for exchange, keys in g.topic_write.items()
        ],
    }


async def apply(management_url: str, grants: Sequence[Grant], passwords: Mapping[str, str], vhost: str = "/") -> None:
    """Create or update each user and set its permissions through the management API."""
    from urllib.parse import unquote, urlsplit

    import httpx

    parts = urlsplit(management_url)
    base = f"{parts.scheme}://{parts.hostname}:{parts.port or 15672}{parts.path.rstrip('/')}"
    auth = (unquote(parts.username or "guest"), unquote(parts.password or "guest"))
    v = quote(vhost, safe="")
    async with httpx.AsyncClient(base_url=base, auth=auth, timeout=10) as client:
        for grant in grants:
            user = quote(grant.user, safe="")
            steps = [
                (f"/api/users/{user}", {"password": passwords[grant.user], "tags": grant.tags}),
                (f"/api/permissions/{v}/{user}", {"configure": grant.configure, "write": grant.write, "read": grant.read}),
                *(
                    (f"/api/topic-permissions/{v}/{user}", {"exchange": exchange, "write": keys, "read": ".*"})
                    for exchange, keys in grant.topic_write.items()
                ),
            ]
            for path, body in steps:
                response = await client.put(path, json=body)
                if response.status_code not in (201, 204):
                    raise RuntimeError(f"PUT {path}: {response.status_code} {response.text[:200]}")
