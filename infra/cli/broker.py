"""`compensa broker grant|definitions`: the least-privilege RabbitMQ users (`infra/broker_access.py`).

Passwords come from environment variables, one per user: `<prefix><ROLE>` with the
`compensa-` prefix dropped and every other character that is not a letter or digit
written `_` (`compensa-relay` → `COMPENSA_BROKER_PASSWORD_RELAY`, an upstream
`erp-eu` → `COMPENSA_BROKER_PASSWORD_ERP_EU`). A missing one is refused by name;
nothing is applied or written until every password is there.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import unquote, urlsplit

import typer

from infra.cli.common import JsonOpt, cell, clip, command, console, fail, print_json, unwrapped

app = typer.Typer(help="Broker users and permissions: least privilege per role.", no_args_is_help=True)

DEFAULT_PREFIX = "COMPENSA_BROKER_PASSWORD_"

ManagementOpt = Annotated[
    str | None,
    typer.Option(
        "--management-url",
        help="RabbitMQ management API, http://admin:password@host:15672/ (default COMPENSA_AMQP_MANAGEMENT_URL, "
        "else derived from COMPENSA_AMQP_URL).",
    ),
]
PrefixOpt = Annotated[
    str,
    typer.Option("--password-env-prefix", help="Each user's password is read from this prefix + its role (RELAY, SAGA, …)."),
]
UpstreamOpt = Annotated[
    list[str],
    typer.Option(
        "--upstream", help="An upstream producer on raw AMQP, NAME:TYPE[,TYPE…] (repeatable): it may publish only those events."
    ),
]
VhostOpt = Annotated[str | None, typer.Option("--vhost", help="Virtual host (default: the one COMPENSA_AMQP_URL names, else /).")]


def password_variable(user: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The environment variable holding `user`'s password."""
    role = user.removeprefix("compensa-")
    return prefix + re.sub(r"[^A-Za-z0-9]", "_", role).upper()


def _upstream(values: list[str]) -> list[Any]:
    from contracts.messages import EVENTS
    from infra.broker_access import upstream_grant

    events = sorted(m.message_type for m in EVENTS)
    grants = []
    for value in values:
        name, sep, types = value.partition(":")
        name = name.strip()
        chosen = [t.strip() for t in types.split(",") if t.strip()]
        if not sep or not name or not chosen:
            fail(f"--upstream: expected NAME:TYPE[,TYPE…] (erp:order.created), got {clip(value)}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
            fail(f"--upstream: user name {clip(name)} must be 1-64 letters, digits, '.', '_' or '-'")
        unknown = [t for t in chosen if t not in events]
        if unknown:
            fail(f"--upstream {name}: {clip(', '.join(unknown))} is not an event type; choose from {', '.join(events)}")
        grants.append(upstream_grant(name, chosen))
    return grants


def _grants(upstream: list[str], prefix: str) -> tuple[list[Any], dict[str, str]]:
    """compensa's users plus the upstream ones, and each one's password from the environment."""
    from infra.broker_access import compensa_grants

    grants = [*compensa_grants(), *_upstream(upstream)]
    variables: dict[str, str] = {}
    for grant in grants:
        variable = password_variable(grant.user, prefix)
        if variable in variables.values() or grant.user in variables:
            fail(f"--upstream: user {clip(grant.user)} clashes with another user (same name or password variable {variable})")
        variables[grant.user] = variable
    missing = [f"{variables[g.user]} ({g.user})" for g in grants if not os.environ.get(variables[g.user])]
    if missing:
        fail(f"no password for {len(missing)} broker user(s): set {', '.join(missing)}")
    return grants, {g.user: os.environ[variables[g.user]] for g in grants}


def _vhost(vhost: str | None) -> str:
    from infra.settings import get_settings

    if vhost is not None:
        return vhost
    path = urlsplit(get_settings().amqp_url or "").path
    return unquote(path[1:]) if len(path) > 1 else "/"


def _hidden(url: str) -> str:
    """The management URL as shown: its password hidden."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=f"{parts.username}:***@{parts.netloc.rpartition('@')[2]}").geturl()


def _described(grants: list[Any]) -> list[dict[str, Any]]:
    """What each user may do, as `--json` shows it (never a password)."""
    return [
        {
            "user": g.user,
            "tags": g.tags,
            "configure": g.configure,
            "write": g.write,
            "read": g.read,
            "topic_write": dict(g.topic_write),
        }
        for g in grants
    ]


def _show(grants: list[Any]) -> None:
    """One line per user: what it may configure, write (exchanges) and read (queues)."""
    for g in grants:
        topics = "".join(f", topic {exchange} {keys}" for exchange, keys in g.topic_write.items())
        tags = f" [{g.tags}]" if g.tags else ""
        unwrapped.print(cell(f"{g.user}{tags}: configure {g.configure}, write {g.write}, read {g.read}{topics}"))


@app.command("grant")
@command
async def broker_grant(
    management_url: ManagementOpt = None,
    password_env_prefix: PrefixOpt = DEFAULT_PREFIX,
    upstream: UpstreamOpt = [],  # noqa: B006
    vhost: VhostOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create or update compensa's broker users and their permissions through the management API (idempotent)."""
    import httpx

    from infra.broker_access import apply
    from infra.settings import derive_management_url, get_settings

    grants, passwords = _grants(upstream, password_env_prefix)
    settings = get_settings()
    url = (
        management_url
        or settings.amqp_management_url
        or (derive_management_url(settings.amqp_url) if settings.amqp_url else None)
    )
    if not url:
        fail("no management API: pass --management-url, or set COMPENSA_AMQP_MANAGEMENT_URL or COMPENSA_AMQP_URL")
    if urlsplit(url).scheme not in ("http", "https"):
        fail(f"--management-url must be http(s)://user:password@host:15672/, not {clip(urlsplit(url).scheme + '://…')}")
    where = _vhost(vhost)
    try:
        await apply(url, grants, passwords, vhost=where)
    except (httpx.HTTPError, RuntimeError) as exc:
        fail(f"the management API at {_hidden(url)} refused or did not answer: {exc}")
    if as_json:
        print_json({"vhost": where, "management_url": _hidden(url), "users": _described(grants)})
        return
    _show(grants)
    console.print(cell(f"granted {len(grants)} users in vhost {where!r} through {_hidden(url)}"))


@app.command("definitions")
@command
async def broker_definitions(
    out: Annotated[Path, typer.Option("--out", help="Write the definitions document (JSON) to this file.")],
    password_env_prefix: PrefixOpt = DEFAULT_PREFIX,
    upstream: UpstreamOpt = [],  # noqa: B006
    vhost: VhostOpt = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print what was written (the file, the vhost, each user's permissions; no hashes) as one JSON document; "
            'the definitions themselves go to --out. A failure is {"ok": false, "error": "…"}.',
        ),
    ] = False,
) -> None:
    """Write RabbitMQ's definitions document (users with hashed passwords, permissions) for `load_definitions`."""
    from infra.broker_access import definitions

    grants, passwords = _grants(upstream, password_env_prefix)
    where = _vhost(vhost)
    document = {"vhosts": [{"name": where}], **definitions(grants, passwords, vhost=where)}
    try:
        # It holds password hashes: readable by its owner only.
        descriptor = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(json.dumps(document, indent=2, sort_keys=True) + "\n")
    except OSError as exc:
        fail(f"--out: cannot write {clip(str(out), 80)}: {exc.strerror or exc}")
    if as_json:
        print_json({"out": str(out), "vhost": where, "users": _described(grants)})
        return
    console.print(cell(f"wrote definitions of {len(grants)} users (hashed passwords) for vhost {where!r} to {out}"))
