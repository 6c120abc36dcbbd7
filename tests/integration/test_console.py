"""The operator console's routes on the real PostgreSQL, through httpx against the app.

Sign-in is required (pages redirect, JSON answers 401); a session expires and a revoked
token ends it; every POST needs its form's CSRF token; a viewer sees no action and is
refused one (403, audited as denied); a dry run writes nothing; an edit is a JSON merge
patch validated against the contract (an invalid one is refused naming the field); a
replay and a saga cancel are recorded in the audit trail with the operator's name, and
so are CLI actions (as COMPENSA_OPERATOR); pages are paged by keyset.
"""

from __future__ import annotations

import asyncio
import html
import json
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts import ChargePayment, Money, OrderCreated, OrderLine, encode, new_message
from infra import topology as t
from infra.audit import audit_log
from infra.bootstrap import orchestrator_for
from infra.console.app import create_app
from infra.dlq.tables import dead_letters
from infra.operators import OperatorStore, generate_token, operators
from infra.settings import Settings
from outbox.tables import tables_for
from outbox.uow import UnitOfWork
from sagas.tables import saga_history, saga_instances
from tests.harness.servers.process import free_port
from tests.integration.support import stack_env
from tests.support import COMPENSA, compensa, eventually

pytestmark = pytest.mark.integration


class ShiftedClock:
    """The system clock, moved forward by hand (to expire sessions)."""

    def __init__(self) -> None:
        self.shift = timedelta(0)

    def now(self) -> datetime:
        return datetime.now(UTC) + self.shift


@pytest.fixture
async def engine(pg_engine: AsyncEngine) -> AsyncEngine:
    async with pg_engine.begin() as connection:
        for table in (audit_log, operators, dead_letters, tables_for("dlq").outbox, tables_for("saga").outbox):
            await connection.execute(delete(table))
        await connection.execute(delete(saga_history))
        await connection.execute(delete(saga_instances))
    return pg_engine


@pytest.fixture
def clock() -> ShiftedClock:
    return ShiftedClock()


@pytest.fixture
def settings(engine: AsyncEngine) -> Settings:
    return Settings(
        database_url=engine.url.render_as_string(hide_password=False),
        console_secret="s" * 40,
        console_session_seconds=600,
        saga_step_deadline_seconds=300,
        health_stuck_seconds=269.5,  # the stuck badge counts, and links to, sagas unchanged for 270s
    )


@pytest.fixture
async def client(engine: AsyncEngine, settings: Settings, clock: ShiftedClock) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, engine=engine, clock=clock)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://console") as client:
        yield client


async def token_for(engine: AsyncEngine, name: str, role: str) -> str:
    token, record = generate_token(name, role, datetime.now(UTC))
    await OperatorStore(engine).add(record)
    return token


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, html[:500]
    return match.group(1)


async def sign_in(client: httpx.AsyncClient, token: str) -> str:
    """Sign in; return the CSRF token of the session's forms."""
    page = await client.get("/signin")
    answer = await client.post("/signin", data={"csrf": csrf_of(page.text), "token": token, "next": "/sagas"})
    assert answer.status_code == 303 and answer.headers["location"] == "/sagas", answer.text
    sagas = await client.get("/sagas")
    assert sagas.status_code == 200
    return csrf_of(sagas.text)


async def add_dead_letter(engine: AsyncEngine, order_id: str, token: str = "tok_unavailable_1") -> int:
    """A payment.charge dead-lettered after transient failures, as the archive stores it."""
    message = new_message(
        ChargePayment(order_id=order_id, amount=Money(amount=3000, currency="EUR"), payment_token=token),
        correlation_id=order_id,
        producer="saga",
    )
    now = datetime.now(UTC)
    async with engine.begin() as connection:
        result = await connection.execute(
            insert(dead_letters)
            .values(
                dedup_key=uuid.uuid4().hex + uuid.uuid4().hex,
                queue=t.PAYMENTS_COMMANDS.name,
                dlq=t.PAYMENTS_COMMANDS.dlq,
                message_id=str(message.message_id),
                type="payment.charge",
                version=1,
                saga_id=order_id,
                reason_class="transient_exhausted",
                reason="gateway unavailable <b>after 5 attempts</b>",
                attempts=5,
                original_exchange="compensa.commands",
                original_routing_key="payment.charge",
                first_failure_at=now,
                last_failure_at=now,
                body=encode(message.envelope).decode(),
                headers=json.dumps({"x-compensa-reason-class": "transient_exhausted"}),
                archived_at=now,
            )
            .returning(dead_letters.c.id)
        )
        return int(result.scalar_one())


async def start_saga(engine: AsyncEngine, settings: Settings, order_id: str) -> None:
    """A running order saga (it has sent stock.reserve), through the orchestrator."""
    created = new_message(
        OrderCreated(
            order_id=order_id,
            customer_id="c-1",
            lines=(OrderLine(sku="SKU-1", quantity=1, unit_price=3000),),
            total=Money(amount=3000, currency="EUR"),
            payment_token="tok_unavailable_1",
        ),
        correlation_id=order_id,
        producer="orders",
    )
    async with UnitOfWork(engine, "saga", ShiftedClock()) as uow:
        await orchestrator_for(settings).handle(uow, created)
        await uow.commit()


async def audit_rows(engine: AsyncEngine) -> list[Any]:
    async with engine.connect() as connection:
        return (await connection.execute(select(audit_log).order_by(audit_log.c.id))).all()


async def letter_status(engine: AsyncEngine, dead_letter_id: int) -> str:
    async with engine.connect() as connection:
        return (await connection.execute(select(dead_letters.c.status).where(dead_letters.c.id == dead_letter_id))).scalar_one()


async def dlq_outbox_count(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        return (await connection.execute(select(func.count()).select_from(tables_for("dlq").outbox))).scalar_one()


# ---------------------------------------------------------------- access


async def test_every_page_needs_a_sign_in(client: httpx.AsyncClient) -> None:
    for path in ("/sagas", "/sagas/o-1", "/dead-letters", "/dead-letters/1", "/audit"):
        answer = await client.get(path)
        assert answer.status_code == 303 and answer.headers["location"].startswith("/signin?next="), path
    assert (await client.get("/live.json")).status_code == 401
    action = await client.post("/dead-letters/replay", data={"ids": "1"})
    assert action.status_code == 303 and action.headers["location"].startswith("/signin")


async def test_a_wrong_token_is_refused_and_the_sign_in_form_needs_its_csrf_token(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    token = await token_for(engine, "alice", "operator")
    page = await client.get("/signin")
    wrong = await client.post("/signin", data={"csrf": csrf_of(page.text), "token": token[:-2] + "xx"})
    assert wrong.status_code == 401 and "unknown, malformed or revoked token" in wrong.text
    assert "compensa_session" not in wrong.cookies
    forged = await client.post("/signin", data={"csrf": "forged", "token": token})
    assert forged.status_code == 403 and "CSRF" in forged.text


async def test_a_session_expires_and_a_revoked_token_ends_it(
    client: httpx.AsyncClient, engine: AsyncEngine, clock: ShiftedClock
) -> None:
    token = await token_for(engine, "alice", "viewer")
    await sign_in(client, token)
    assert (await client.get("/audit")).status_code == 200
    clock.shift = timedelta(seconds=601)  # console_session_seconds is 600
    expired = await client.get("/audit")
    assert expired.status_code == 303 and expired.headers["location"].startswith("/signin")

    clock.shift = timedelta(0)
    await sign_in(client, token)
    await OperatorStore(engine).revoke("alice", datetime.now(UTC))
    assert (await client.get("/audit")).status_code == 303
    page = await client.get("/signin")
    assert (await client.post("/signin", data={"csrf": csrf_of(page.text), "token": token})).status_code == 401


async def test_forms_need_the_sessions_csrf_token(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    letter = await add_dead_letter(engine, "o-csrf")
    await sign_in(client, await token_for(engine, "alice", "operator"))
    for data in ({"id": str(letter)}, {"id": str(letter), "csrf": "0" * 64}):
        answer = await client.post("/dead-letters/purge/preview", data=data)
        assert answer.status_code == 403 and "CSRF" in answer.text
    # A token of another session does not do either.
    other = httpx.AsyncClient(transport=client._transport, base_url="http://console")  # type: ignore[attr-defined]
    async with other:
        foreign = await sign_in(other, await token_for(engine, "bob", "operator"))
    answer = await client.post("/dead-letters/purge", data={"ids": str(letter), "csrf": foreign})
    assert answer.status_code == 403
    assert await letter_status(engine, letter) == "new"


async def test_a_viewer_sees_no_action_and_is_refused_one(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    letter = await add_dead_letter(engine, "o-viewer")
    csrf = await sign_in(client, await token_for(engine, "vera", "viewer"))
    page = await client.get(f"/dead-letters/{letter}")
    assert page.status_code == 200 and "gateway unavailable &lt;b&gt;after 5 attempts&lt;/b&gt;" in page.text
    assert 'id="dry-run"' not in page.text and 'id="purge"' not in page.text
    group = await client.get("/dead-letters/group", params={"queue": "payments.commands"})
    assert group.status_code == 200 and "preview-group" not in group.text and 'class="pick"' not in group.text
    for path, data in (
        ("/dead-letters/replay/preview", {"id": str(letter)}),
        ("/dead-letters/replay", {"ids": str(letter)}),
        ("/dead-letters/purge", {"ids": str(letter)}),
    ):
        answer = await client.post(path, data={**data, "csrf": csrf})
        assert answer.status_code == 403 and "actions need the operator role" in answer.text, path
    assert await letter_status(engine, letter) == "new"
    denied = await audit_rows(engine)
    assert [(r.actor, r.via, r.action, r.outcome) for r in denied] == [
        ("vera", "console", "dlq.replay", "denied"),
        ("vera", "console", "dlq.replay", "denied"),
        ("vera", "console", "dlq.purge", "denied"),
    ]


# ---------------------------------------------------------------- dead letters


async def test_groups_members_and_a_dead_letter_in_full(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    first = await add_dead_letter(engine, "o-g1")
    await add_dead_letter(engine, "o-g2")
    await sign_in(client, await token_for(engine, "alice", "viewer"))
    groups = await client.get("/dead-letters")
    assert groups.status_code == 200
    row = re.search(r"<tr><td><a class=\"group-link\".*?</tr>", groups.text, re.S)
    assert row and "payments.commands" in row.group(0) and "transient_exhausted" in row.group(0)
    assert "payment.charge" in row.group(0) and '<td class="num">2</td>' in row.group(0)
    members = await client.get("/dead-letters/group", params={"queue": "payments.commands", "type": "payment.charge"})
    assert members.text.count('class="member"') == 2
    page = await client.get(f"/dead-letters/{first}")
    assert '"payment_token": "tok_unavailable_1"' in html.unescape(page.text)
    assert "x-compensa-reason-class" in page.text and "o-g1" in page.text
    assert (await client.get("/dead-letters/group", params={"queue": "nope"})).status_code == 400
    assert (await client.get("/dead-letters/abc")).status_code == 400


async def test_a_dry_run_writes_nothing_and_an_invalid_edit_is_refused_naming_the_field(
    client: httpx.AsyncClient, engine: AsyncEngine, settings: Settings
) -> None:
    await start_saga(engine, settings, "o-dry")
    letter = await add_dead_letter(engine, "o-dry")
    csrf = await sign_in(client, await token_for(engine, "alice", "operator"))
    preview = await client.post(
        "/dead-letters/replay/preview", data={"csrf": csrf, "id": str(letter), "patch": '{"payment_token": "tok_ok_1"}'}
    )
    assert preview.status_code == 200, preview.text
    assert "Would replay 1, skip 0, refuse 0" in preview.text
    assert "saga o-dry is running at step 0" in preview.text
    assert "-  &#34;payment_token&#34;: &#34;tok_unavailable_1&#34;" in preview.text
    assert "+  &#34;payment_token&#34;: &#34;tok_ok_1&#34;" in preview.text
    assert await letter_status(engine, letter) == "new" and await dlq_outbox_count(engine) == 0
    assert await audit_rows(engine) == []  # a dry run is not an action

    invalid = await client.post(
        "/dead-letters/replay/preview", data={"csrf": csrf, "id": str(letter), "patch": '{"payment_token": ""}'}
    )
    assert "refuse 1" in invalid.text and "payment_token" in invalid.text and 'id="confirm-replay"' not in invalid.text
    for patch, says in (("[1]", "must be a JSON object"), ("{oops", "not valid JSON")):
        refused = await client.post("/dead-letters/replay/preview", data={"csrf": csrf, "id": str(letter), "patch": patch})
        assert refused.status_code == 400 and says in refused.text
    # The confirmation revalidates: an invalid edit posted straight to it is refused too.
    direct = await client.post("/dead-letters/replay", data={"csrf": csrf, "ids": str(letter), "patch": '{"amount": 5}'})
    assert "refused 1" in direct.text and "amount" in direct.text
    assert await letter_status(engine, letter) == "new" and await dlq_outbox_count(engine) == 0


async def test_a_replay_with_an_edit_is_sent_once_and_audited(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    letter = await add_dead_letter(engine, "o-replay")
    csrf = await sign_in(client, await token_for(engine, "alice", "operator"))
    patch = '{"payment_token": "tok_ok_1"}'
    preview = await client.post("/dead-letters/replay/preview", data={"csrf": csrf, "id": str(letter), "patch": patch})
    confirm = re.search(r'<form method="post" action="/dead-letters/replay">.*?</form>', preview.text, re.S)
    assert confirm, preview.text
    ids = re.search(r'name="ids" value="([^"]+)"', confirm.group(0))
    assert ids and ids.group(1) == str(letter)
    done = await client.post("/dead-letters/replay", data={"csrf": csrf, "ids": ids.group(1), "patch": patch})
    assert done.status_code == 200 and "Replayed 1, skipped 0, refused 0" in done.text
    assert await letter_status(engine, letter) == "replayed"
    async with engine.connect() as connection:
        body = (await connection.execute(select(tables_for("dlq").outbox.c.body))).scalar_one()
    assert json.loads(body)["payload"]["payment_token"] == "tok_ok_1"
    again = await client.post("/dead-letters/replay", data={"csrf": csrf, "ids": str(letter), "patch": patch})
    assert "Replayed 0, skipped 1" in again.text and await dlq_outbox_count(engine) == 1
    rows = await audit_rows(engine)
    assert [(r.actor, r.action, r.outcome, r.saga_id) for r in rows] == [
        ("alice", "dlq.replay", "ok", "o-replay"),
        ("alice", "dlq.replay", "refused", "o-replay"),
    ]
    assert json.loads(rows[0].parameters) == {"patch": {"payment_token": "tok_ok_1"}}
    assert json.loads(rows[0].targets) == [letter]
    audit_page = await client.get("/audit", params={"actor": "alice"})
    assert audit_page.text.count('class="audit-row"') == 2 and "tok_ok_1" in audit_page.text


async def test_a_group_is_replayed_whole_and_purged(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    letters = [await add_dead_letter(engine, f"o-grp-{i}", token="tok_ok_1") for i in range(3)]
    csrf = await sign_in(client, await token_for(engine, "alice", "operator"))
    group = {"queue": "payments.commands", "reason_class": "transient_exhausted", "type": "payment.charge"}
    preview = await client.post("/dead-letters/replay/preview", data={"csrf": csrf, "scope": "group", **group})
    assert "Would replay 3" in preview.text and "no saga o-grp-0 exists" in preview.text
    ids = re.search(r'name="ids" value="([^"]+)"', preview.text)
    assert ids and ids.group(1) == f"{letters[0]}-{letters[2]}"
    purge = await client.post("/dead-letters/purge/preview", data={"csrf": csrf, "scope": "selected", "id": str(letters[1])})
    assert "Purge 1 dead letter?" in purge.text
    done = await client.post("/dead-letters/purge", data={"csrf": csrf, "ids": str(letters[1])})
    assert "purged 1 dead letters" in done.text
    assert [await letter_status(engine, i) for i in letters] == ["new", "purged", "new"]
    assert [(r.action, r.outcome, json.loads(r.targets)) for r in await audit_rows(engine)] == [("dlq.purge", "ok", [letters[1]])]


# ---------------------------------------------------------------- sagas


async def test_a_saga_page_and_a_cancel_with_a_reason(client: httpx.AsyncClient, engine: AsyncEngine, settings: Settings) -> None:
    await start_saga(engine, settings, "o-cancel")
    await add_dead_letter(engine, "o-cancel")
    csrf = await sign_in(client, await token_for(engine, "alice", "operator"))
    page = await client.get("/sagas/o-cancel")
    assert page.status_code == 200
    assert "<svg" in page.text and "order.created" in page.text and "sends stock.reserve" in page.text
    assert "dead letter #" in page.text and "active deadline" in page.text
    assert 'id="cancel"' in page.text
    blank = await client.post("/sagas/o-cancel/cancel", data={"csrf": csrf, "reason": "  "})
    assert blank.status_code == 400 and "give a reason" in blank.text
    done = await client.post("/sagas/o-cancel/cancel", data={"csrf": csrf, "reason": "customer called"})
    assert done.status_code == 200 and "saga o-cancel is now compensating" in done.text
    again = await client.post("/sagas/o-cancel/cancel", data={"csrf": csrf, "reason": "again"})
    assert again.status_code == 409 and "refused" in again.text
    retry = await client.post("/sagas/o-cancel/retry", data={"csrf": csrf})
    assert retry.status_code == 409 and "not compensation_failed" in retry.text
    rows = await audit_rows(engine)
    assert [(r.actor, r.action, r.outcome, r.saga_id) for r in rows] == [
        ("alice", "saga.cancel", "ok", "o-cancel"),
        ("alice", "saga.cancel", "refused", "o-cancel"),
        ("alice", "saga.retry", "refused", "o-cancel"),
    ]
    assert json.loads(rows[0].parameters) == {"reason": "customer called"}
    timeline = await client.get("/sagas/o-cancel")
    assert "operator:cancel" in timeline.text and "alice: saga.cancel (ok)" in timeline.text


async def test_the_saga_list_filters_and_pages_by_keyset(
    client: httpx.AsyncClient, engine: AsyncEngine, settings: Settings
) -> None:
    now = datetime.now(UTC)
    rows = [
        {
            "saga_id": f"k-{i:03d}",
            "definition": "order",
            "status": "completed" if i % 3 else "running",
            "step": 0,
            "data": "{}",
            "done_steps": "[]",
            "pending_compensations": "[]",
            "compensation_attempts": 0,
            "reason": None,
            "version": 1,
            "started_at": now - timedelta(hours=2),
            "updated_at": now - timedelta(minutes=i % 7),  # ties on updated_at: the id breaks them
        }
        for i in range(120)
    ]
    async with engine.begin() as connection:
        await connection.execute(insert(saga_instances), rows)
    await sign_in(client, await token_for(engine, "alice", "viewer"))
    seen: list[str] = []
    url: str | None = "/sagas"
    while url:
        page = await client.get(url)
        assert page.status_code == 200
        seen += re.findall(r'<a href="/sagas/(k-[0-9]+)">', page.text)
        found = re.search(r'<a href="([^"]+)" id="next">', page.text)
        url = found.group(1).replace("&amp;", "&") if found else None
    assert sorted(seen) == sorted(r["saga_id"] for r in rows) and len(seen) == 120
    running = await client.get("/sagas", params={"status": "running", "q": "k-00"})
    assert set(re.findall(r'<a href="/sagas/(k-[0-9]+)">', running.text)) == {"k-000", "k-003", "k-006", "k-009"}
    assert "running <b>40</b>" in running.text and "completed <b>80</b>" in running.text
    stuck = await client.get("/sagas", params={"stuck_for": "270s"})  # between the rows' minutes: no boundary race
    assert set(re.findall(r'<a href="/sagas/(k-[0-9]+)">', stuck.text)) == {
        r["saga_id"] for r in rows if r["status"] == "running" and r["updated_at"] < now - timedelta(seconds=270)
    }
    assert (await client.get("/sagas", params={"q": "%"})).text.count('<a href="/sagas/k-') == 0  # LIKE characters are text
    assert (await client.get("/sagas", params={"status": "bogus"})).status_code == 400
    assert (await client.get("/sagas", params={"stuck_for": "soon"})).status_code == 400
    live = (await client.get("/live.json")).json()
    assert live["running"] == 40 and live["new_dead_letters"] == 0
    # The stuck badge links to the list of the sagas it counts (health_stuck_seconds, 270s here).
    badge = re.search(r'<a href="([^"]+)" id="live-stuck-link"[^>]*>stuck <b id="live-stuck">([0-9]+)</b>', stuck.text)
    assert badge and badge.group(1) == "/sagas?stuck_for=270s"
    linked = set(re.findall(r'<a href="/sagas/(k-[0-9]+)">', (await client.get(badge.group(1))).text))
    assert linked == set(re.findall(r'<a href="/sagas/(k-[0-9]+)">', stuck.text))
    assert int(badge.group(2)) == live["stuck"] == len(linked) > 0


# ---------------------------------------------------------------- tracing


@pytest.fixture
async def console_process(engine: AsyncEngine, tmp_path: Path) -> AsyncIterator[str]:
    """`compensa console` as an OS process (it starts its own telemetry); its base URL once it answers."""
    port = free_port()
    env = stack_env(engine, COMPENSA_CONSOLE_PORT=str(port), COMPENSA_CONSOLE_SECRET="t" * 40)
    log = tmp_path / "console.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(COMPENSA, "console", env=env, stdout=out, stderr=asyncio.subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base) as probe:

            async def answers() -> bool:
                assert process.returncode is None, log.read_text(errors="replace")
                try:
                    return (await probe.get("/signin")).status_code == 200
                except httpx.TransportError:
                    return False

            await eventually(answers, timeout=30, interval=0.1, message="compensa console did not answer")
        yield base
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 20)


def trace_id(traceparent: str | None) -> str:
    assert traceparent, "no traceparent"
    version, trace, span, flags = traceparent.split("-")
    assert (version, len(trace), len(span), len(flags)) == ("00", 32, 16, 2) and trace != "0" * 32, traceparent
    return trace


async def test_a_console_cancel_sends_its_compensations_in_the_sagas_trace(
    engine: AsyncEngine, settings: Settings, console_process: str
) -> None:
    await start_saga(engine, settings, "o-traced")
    outbox = tables_for("saga").outbox
    async with engine.connect() as connection:
        (reserve,) = (await connection.execute(select(outbox.c.body).where(outbox.c.type == "stock.reserve"))).scalars()
    order_trace = trace_id(json.loads(reserve)["traceparent"])
    token = await token_for(engine, "alice", "operator")
    async with httpx.AsyncClient(base_url=console_process) as client:
        csrf = await sign_in(client, token)
        done = await client.post("/sagas/o-traced/cancel", data={"csrf": csrf, "reason": "customer called"})
        assert done.status_code == 200 and "now compensating" in done.text, done.text[:500]
    async with engine.connect() as connection:
        sent = (await connection.execute(select(outbox.c.body).where(outbox.c.type == "stock.release"))).scalars().all()
    assert len(sent) == 1
    # The console process's span carries the order's trace on (the test process did not write this row).
    assert trace_id(json.loads(sent[0])["traceparent"]) == order_trace
    assert json.loads(sent[0])["traceparent"] != json.loads(reserve)["traceparent"]


# ---------------------------------------------------------------- the CLI


async def test_cli_actions_are_audited_as_the_configured_operator(engine: AsyncEngine, settings: Settings) -> None:
    letter = await add_dead_letter(engine, "o-cli")
    env = stack_env(engine, COMPENSA_OPERATOR="carol")
    added = await compensa(env, "operators", "add", "dave", "--role", "operator")
    assert added.returncode == 0, added.stderr
    assert re.fullmatch(r"cop_[0-9a-f]{16}_\S+\n", added.stdout)
    listed = await compensa(env, "operators", "list", "--json")
    assert [(o["name"], o["role"]) for o in listed.json()] == [("dave", "operator")]
    assert "key_hash" not in listed.stdout and added.stdout.strip() not in listed.stdout
    bad_role = await compensa(env, "operators", "add", "eve", "--role", "admin")
    assert bad_role.returncode == 1 and "unknown role 'admin'" in bad_role.stderr
    assert (await compensa(env, "dlq", "purge", str(letter), "--yes")).returncode == 0
    assert (await compensa(env, "operators", "revoke", "dave")).returncode == 0
    assert (await compensa(env, "operators", "revoke", "nobody")).returncode == 1
    trail = await compensa(env, "audit", "list", "--json")
    assert trail.returncode == 0, trail.stderr
    assert [(r["actor"], r["via"], r["action"], r["outcome"]) for r in reversed(trail.json())] == [
        ("carol", "cli", "operators.add", "ok"),
        ("carol", "cli", "dlq.purge", "ok"),
        ("carol", "cli", "operators.revoke", "ok"),
        ("carol", "cli", "operators.revoke", "refused"),
    ]
    table = await compensa(env, "audit", "list", "--action", "dlq.purge")
    assert table.returncode == 0 and "carol" in table.stdout and "dlq.purge" in table.stdout


async def test_cli_dead_letter_and_saga_actions_are_audited_with_their_saga(engine: AsyncEngine, settings: Settings) -> None:
    one = await add_dead_letter(engine, "o-cli-a", token="tok_ok_1")
    other = await add_dead_letter(engine, "o-cli-b", token="tok_ok_1")
    third = await add_dead_letter(engine, "o-cli-c", token="tok_ok_1")
    await start_saga(engine, settings, "o-cli-s")
    env = stack_env(engine, COMPENSA_OPERATOR="carol")

    async def ok(*args: str) -> None:
        run = await compensa(env, *args)
        assert run.returncode == 0, (args, run.stdout, run.stderr)

    await ok("dlq", "replay", str(one))
    await ok("dlq", "replay", f"{other},{third}")  # two sagas: the row names none
    await ok("dlq", "purge", "--saga", "o-cli-c", "--status", "replayed", "--yes")
    await ok("dlq", "prune", "--older-than", "0s", "--yes", "--app", "infra.apps:ORDER_APP")
    await ok("saga", "cancel", "o-cli-s", "--reason", "customer called", "--yes")
    retry = await compensa(env, "saga", "retry", "o-cli-s")
    assert retry.returncode == 1 and "not compensation_failed" in retry.stderr

    rows = await audit_rows(engine)
    prune = json.loads(rows[3].parameters)
    assert [(r.actor, r.via, r.action, json.loads(r.targets), r.saga_id, r.outcome) for r in rows] == [
        ("carol", "cli", "dlq.replay", [one], "o-cli-a", "ok"),
        ("carol", "cli", "dlq.replay", [other, third], None, "ok"),
        ("carol", "cli", "dlq.purge", [third], "o-cli-c", "ok"),
        ("carol", "cli", "dlq.prune", [f"replayed or purged before {prune['before']}"], None, "ok"),
        ("carol", "cli", "saga.cancel", ["o-cli-s"], "o-cli-s", "ok"),
        ("carol", "cli", "saga.retry", ["o-cli-s"], "o-cli-s", "refused"),
    ]
    assert prune["older_than"] == "0s" and prune["deleted"] == {"replayed": 2, "purged": 1}
    assert rows[3].detail == "deleted 2 replayed and 1 purged dead letters"
    assert datetime.fromisoformat(prune["before"]) <= rows[3].at
    assert json.loads(rows[4].parameters) == {"reason": "customer called"}
    async with engine.connect() as connection:
        assert (await connection.execute(select(func.count()).select_from(dead_letters))).scalar_one() == 0

    by_saga = await compensa(env, "audit", "list", "--saga", "o-cli-a", "--json")
    assert [(r["action"], r["targets"]) for r in by_saga.json()] == [("dlq.replay", [one])]


# ---------------------------------------------------------------- the benchmark


async def test_bench_console_seeds_and_times_every_console_query(engine: AsyncEngine) -> None:
    """A small run (2,000 sagas): the seeded counts and one timing per query; never a timed assertion."""
    run = await compensa(stack_env(engine), "bench", "console", "--sagas", "2000", "--runs", "1", "--json", timeout=120)
    assert run.returncode == 0, run.stderr
    report = run.json()
    assert report["rows"] == {"saga_instances": 2000, "saga_history": 20000, "dead_letters": 400, "audit_log": 40}
    queries = {q["query"]: q for q in report["queries"]}
    assert len(queries) == 22 and all(q["median_ms"] > 0 for q in queries.values())
    assert queries["saga list: unfiltered, page 1"]["rows"] == 51
    assert queries["saga list: saga type subscription (0.02 %)"]["rows"] == 0  # i % 5000 = 0: none of 2,000
    assert queries["saga list: stuck for 1d (none are)"]["rows"] == 0
    assert queries["saga list: stuck for 10m"]["rows"] == 14  # 7 of every 1,000 are stuck for hours
