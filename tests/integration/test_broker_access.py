"""Least-privilege broker users on the real RabbitMQ: each may publish only what it owns."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import aiormq
import pytest
from yarl import URL

from infra import topology as t
from infra.broker_access import apply, compensa_grants, definitions, upstream_grant
from infra.cli.broker import password_variable
from infra.transport.rabbit import RabbitTransport

pytestmark = pytest.mark.integration

PASSWORD = "s3cret-for-tests"


@pytest.fixture(scope="module")
async def users(servers, amqp_url: str) -> AsyncIterator[dict[str, str]]:  # type: ignore[no-untyped-def]
    """Every compensa user plus an upstream producer allowed only order.created; name -> AMQP URL."""
    management = servers.rabbitmq.management_url
    if not management:
        pytest.skip("this RabbitMQ has no management API")
    transport = RabbitTransport(amqp_url)
    await transport.declare_topology()
    await transport.close()
    grants = [*compensa_grants(), upstream_grant("upstream-erp", ["order.created"])]
    await apply(management, grants, {g.user: PASSWORD for g in grants})
    base = URL(amqp_url)
    yield {g.user: str(base.with_user(g.user).with_password(PASSWORD)) for g in grants}


async def publish(url: str, exchange: str, routing_key: str) -> None:
    """Publish one persistent message with confirms; raise what the broker answers."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        target = channel.default_exchange if exchange == "" else await channel.get_exchange(exchange, ensure=False)
        body = json.dumps({"type": routing_key, "at": datetime.now(UTC).isoformat()}).encode()
        await target.publish(aio_pika.Message(body, message_id=str(uuid.uuid4())), routing_key=routing_key)
        await asyncio.sleep(0)  # a refused publish closes the channel: let that arrive
        await channel.close()
    finally:
        await connection.close()


async def consume_one(url: str, queue: str) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        amqp_queue = await channel.get_queue(queue, ensure=True)
        await amqp_queue.get(fail=False)
    finally:
        await connection.close()


REFUSED = aiormq.exceptions.ChannelAccessRefused


async def test_an_upstream_producer_publishes_only_the_events_it_was_given(users: dict[str, str]) -> None:
    await publish(users["upstream-erp"], t.EVENTS.name, "order.created")
    for exchange, key in (
        (t.EVENTS.name, "payment.authorized"),
        (t.COMMANDS.name, "payment.charge"),
        ("", t.PAYMENTS_COMMANDS.name),
        (t.DLX.name, t.PAYMENTS_COMMANDS.name),
    ):
        with pytest.raises(REFUSED):
            await publish(users["upstream-erp"], exchange, key)
    with pytest.raises(REFUSED):
        await consume_one(users["upstream-erp"], t.PAYMENTS_COMMANDS.name)


async def test_only_the_relay_sends_commands(users: dict[str, str]) -> None:
    await publish(users["compensa-relay"], t.COMMANDS.name, "stock.reserve")
    await publish(users["compensa-relay"], t.EVENTS.name, "stock.reserved")
    for user in ("compensa-stock", "compensa-saga", "compensa-payments", "compensa-dlq"):
        with pytest.raises(REFUSED):
            await publish(users[user], t.COMMANDS.name, "payment.charge")
        with pytest.raises(REFUSED):
            await publish(users[user], t.EVENTS.name, "payment.authorized")
    with pytest.raises(REFUSED):
        await consume_one(users["compensa-relay"], t.STOCK_COMMANDS.name)


async def test_a_service_reads_only_its_own_queues_and_dead_letters_through_the_dlx(users: dict[str, str]) -> None:
    await consume_one(users["compensa-stock"], t.STOCK_COMMANDS.name)
    await consume_one(users["compensa-saga"], t.SAGA_STARTS.name)
    await consume_one(users["compensa-saga"], t.SAGA_EVENTS.name)
    await publish(users["compensa-stock"], t.DLX.name, t.STOCK_COMMANDS.name)
    with pytest.raises(REFUSED):
        await consume_one(users["compensa-stock"], t.PAYMENTS_COMMANDS.name)
    await consume_one(users["compensa-dlq"], t.STOCK_COMMANDS.dlq)
    with pytest.raises(REFUSED):
        await consume_one(users["compensa-dlq"], t.STOCK_COMMANDS.name)


def test_the_definitions_document_holds_every_user_with_a_hashed_password() -> None:
    grants = compensa_grants()
    document = definitions(grants, {g.user: PASSWORD for g in grants})
    assert {u["name"] for u in document["users"]} == {g.user for g in grants}
    assert PASSWORD not in json.dumps(document)
    [relay] = [p for p in document["permissions"] if p["user"] == "compensa-relay"]
    assert (relay["read"], relay["configure"]) == ("^$", "^$")


async def test_compensa_broker_grant_applies_the_users_from_password_variables(
    servers, amqp_url: str, users: dict[str, str]
) -> None:  # type: ignore[no-untyped-def]
    """The command line end to end: the same users (same passwords as the fixture), plus an upstream one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPENSA_")}
    env |= {password_variable(g.user): PASSWORD for g in compensa_grants()}
    env |= {"COMPENSA_BROKER_PASSWORD_ERP_CLI": PASSWORD, "COMPENSA_AMQP_URL": amqp_url}
    compensa = str(Path(sys.executable).with_name("compensa"))
    command = [
        compensa,
        "broker",
        "grant",
        "--management-url",
        servers.rabbitmq.management_url,
        "--upstream",
        "erp-cli:order.created",
    ]
    done = await asyncio.to_thread(subprocess.run, command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"granted {len(compensa_grants()) + 1} users" in " ".join(done.stdout.split())
    erp = str(URL(amqp_url).with_user("erp-cli").with_password(PASSWORD))
    await publish(erp, t.EVENTS.name, "order.created")
    with pytest.raises(REFUSED):
        await publish(erp, t.EVENTS.name, "payment.authorized")
    await publish(users["compensa-relay"], t.COMMANDS.name, "stock.reserve")  # the fixture's users still work

    del env["COMPENSA_BROKER_PASSWORD_SAGA"]
    refused = await asyncio.to_thread(subprocess.run, command, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and refused.stderr.strip().splitlines() == [
        "error: no password for 1 broker user(s): set COMPENSA_BROKER_PASSWORD_SAGA (compensa-saga)"
    ]
