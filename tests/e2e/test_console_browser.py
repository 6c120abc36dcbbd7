"""The operator console in a real browser (Chromium, driven by Selenium) on the real stack.

`compensa run` (every service, the dead-letter archive and the relays) and `compensa
console` run as OS processes on the module's PostgreSQL and RabbitMQ. A payment whose
token fails transiently forever (`tok_unavailable…` in the deterministic gateway) is
retried until it is dead-lettered; its saga waits on the charge step (long deadlines).
An operator signs in, finds the dead letter in its failure group, sees the saga
waiting, edits the token with a merge patch, replays after the dry run, and the saga
completes; the audit trail names her. A viewer gets no replay button, and the request
made anyway is refused. Screenshots of the saga timeline and of the dead-letter groups
go to the test's tmp_path; with COMPENSA_UPDATE_SCREENSHOTS=1 they replace the ones in
docs/img/ that the README shows (a plain run leaves the tracked files alone).
"""

from __future__ import annotations

import asyncio
import html
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from consumers.stock import seed_stock
from infra.dlq.tables import dead_letters
from tests.e2e.support import Process, Stack, place, planned, saga_row, unique
from tests.harness.browser import chrome_driver
from tests.harness.servers.process import free_port
from tests.support import COMPENSA, compensa, eventually

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
#: Where the README's screenshots live; written only on request (COMPENSA_UPDATE_SCREENSHOTS=1).
README_SCREENSHOTS = ROOT / "docs" / "img"
#: The saga must wait for the operator: no deadline fires during the test.
TIMINGS = {
    "saga_step_deadline_seconds": 600.0,
    "saga_compensation_deadline_seconds": 600.0,
    "payment_breaker_enabled": "false",  # every charge reaches the gateway, so it fails until dead-lettered
    "max_attempts": 3,
}
WAIT = 30  # seconds any one browser condition may take


@pytest.fixture
def console_process(stack: Stack, tmp_path: Path) -> Iterator[str]:
    """`compensa console` on a free port; its base URL once it answers."""
    port = free_port()
    env = stack.env(**TIMINGS, console_port=port, console_secret="browser-test-secret-" + "x" * 20)
    log = tmp_path / "console.log"
    with log.open("wb") as out:
        popen = subprocess.Popen([COMPENSA, "console"], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    process = Process(popen, log)
    base = f"http://127.0.0.1:{port}"
    try:
        yield base
    finally:
        popen.terminate()
        try:
            popen.wait(timeout=15)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(timeout=10)
        print(process.tail())


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    """The directory screenshots go to: tmp_path, or docs/img with COMPENSA_UPDATE_SCREENSHOTS=1.

    docs/img is tracked; writing there on every run would leave a dirty checkout behind.
    """
    folder = README_SCREENSHOTS if os.environ.get("COMPENSA_UPDATE_SCREENSHOTS") == "1" else tmp_path / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


async def wait_answering(base: str) -> None:
    def answers() -> bool:
        try:
            with urllib.request.urlopen(f"{base}/signin", timeout=2) as response:  # noqa: S310 - a local http URL
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    async def probe() -> bool:
        return await asyncio.to_thread(answers)

    await eventually(probe, timeout=30, interval=0.2, message="compensa console did not answer")


@pytest.fixture
def browser() -> Iterator[Any]:
    driver = chrome_driver()
    try:
        yield driver
    finally:
        driver.quit()


async def add_operator(env: dict[str, str], name: str, role: str) -> str:
    run = await compensa(env, "operators", "add", name, "--role", role)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


def sign_in(driver: Any, base: str, token: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver.delete_all_cookies()
    driver.get(f"{base}/signin")
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "signin").click()
    WebDriverWait(driver, WAIT).until(ec.presence_of_element_located((By.ID, "who")))


def operator_replays(driver: Any, base: str, token: str, order_id: str, screenshots: Path) -> None:
    """Sign in, open the group, the dead letter, check its saga waits, edit, dry run, replay; wait for completion."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, WAIT)
    sign_in(driver, base, token)
    assert "operator" in driver.find_element(By.ID, "who").text

    driver.get(f"{base}/dead-letters")
    group = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#groups a.group-link")))
    row = group.find_element(By.XPATH, "./ancestor::tr").text
    assert "payments.commands" in row and "transient_exhausted" in row and "payment.charge" in row, row
    assert driver.save_screenshot(str(screenshots / "console-dead-letter-groups.png"))
    group.click()

    member = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#group-members a.member")))
    member.click()
    wait.until(ec.presence_of_element_located((By.ID, "dead-letter-id")))
    assert order_id in driver.find_element(By.ID, "saga-link").text
    assert driver.find_element(By.ID, "saga-status").text == "running"  # the saga waits on its charge
    assert "tok_unavailable" in driver.find_element(By.ID, "payload").text

    driver.find_element(By.ID, "patch").send_keys('{"payment_token": "tok_ok_browser"}')
    driver.find_element(By.ID, "dry-run").click()
    summary = wait.until(ec.presence_of_element_located((By.ID, "preview-summary")))
    assert "Would replay 1, skip 0, refuse 0" in summary.text and "Nothing has been written" in summary.text
    preview = driver.find_element(By.ID, "preview").text
    assert f"saga {order_id} is running" in preview, preview
    diff = driver.find_element(By.CSS_SELECTOR, "pre.diff").text
    assert '+  "payment_token": "tok_ok_browser"' in diff and '-  "payment_token": "tok_unavailable' in diff, diff
    driver.find_element(By.ID, "confirm-replay").click()
    result = wait.until(ec.presence_of_element_located((By.ID, "result")))
    assert "Replayed 1, skipped 0, refused 0" in result.text

    def completed(d: Any) -> bool:
        d.get(f"{base}/sagas/{order_id}")
        return bool(d.find_element(By.ID, "saga-status").text == "completed")

    WebDriverWait(driver, WAIT, poll_frequency=0.5).until(completed)
    timeline = driver.find_element(By.ID, "timeline")
    assert "order.completed" in timeline.get_attribute("innerHTML") or "stock.committed" in timeline.get_attribute("innerHTML")
    assert driver.save_screenshot(str(screenshots / "console-saga-timeline.png"))

    driver.get(f"{base}/audit")
    first_row = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#audit tr.audit-row")))
    cells = first_row.text
    assert "ada" in first_row.find_element(By.CSS_SELECTOR, "td.actor").text
    assert "dlq.replay" in cells and "tok_ok_browser" in cells and "ok" in cells, cells


def viewer_cannot_replay(driver: Any, base: str, token: str, dead_letter_id: int) -> str:
    """A viewer sees the dead letter without a replay button; a replay posted anyway is refused."""
    from selenium.webdriver.common.by import By

    sign_in(driver, base, token)
    driver.get(f"{base}/dead-letters/{dead_letter_id}")
    assert driver.find_elements(By.ID, "dead-letter-id")
    assert not driver.find_elements(By.ID, "dry-run") and not driver.find_elements(By.ID, "confirm-replay")
    # The request a button would have made, sent from the viewer's page with its session and CSRF token.
    csrf = driver.find_element(By.CSS_SELECTOR, "form.signout input[name=csrf]").get_attribute("value")
    script = """
        const done = arguments[arguments.length - 1];
        fetch('/dead-letters/replay', {method: 'POST', credentials: 'same-origin',
            headers: {'Content-Type': 'application/x-www-form-urlencoded'},
            body: new URLSearchParams({csrf: arguments[0], ids: arguments[1]})})
          .then(r => r.text().then(t => done(r.status + ' ' + t)));
    """
    return str(driver.execute_async_script(script, csrf, str(dead_letter_id)))


async def test_an_operator_fixes_a_dead_lettered_payment_in_the_browser(
    stack: Stack, processes: Any, console_process: str, browser: Any, screenshots: Path
) -> None:
    processes(**TIMINGS)  # every service, the archive and the relays
    env = stack.env(**TIMINGS)
    operator_token = await add_operator(env, "ada", "operator")
    viewer_token = await add_operator(env, "vic", "viewer")
    sku = unique("SKU")
    await seed_stock(stack.engine, {sku: 5})
    order = planned([(sku, 1, 2500)], token=f"tok_unavailable_{unique('t')}")
    await place(stack.engine, order)

    async def dead_lettered() -> int | None:
        async with stack.engine.connect() as connection:
            found = await connection.execute(
                select(dead_letters.c.id).where(dead_letters.c.saga_id == order.order_id, dead_letters.c.status == "new")
            )
            return found.scalar_one_or_none()

    letter = await eventually(dead_lettered, timeout=60, interval=0.2, message="the charge was not dead-lettered")
    assert (await saga_row(stack.engine, order.order_id)).status == "running"
    await wait_answering(console_process)

    answer = await asyncio.to_thread(viewer_cannot_replay, browser, console_process, viewer_token, letter)
    assert answer.startswith("403 ") and "actions need the operator role" in html.unescape(answer), answer[:300]

    await asyncio.to_thread(operator_replays, browser, console_process, operator_token, order.order_id, screenshots)
    for name in ("console-dead-letter-groups.png", "console-saga-timeline.png"):
        assert (screenshots / name).read_bytes().startswith(b"\x89PNG"), name
    assert (await saga_row(stack.engine, order.order_id)).status == "completed"
    trail = await compensa(env, "audit", "list", "--json")
    rows = list(reversed(trail.json()))
    assert [(r["via"], r["action"], r["outcome"]) for r in rows[:2]] == [("cli", "operators.add", "ok")] * 2
    assert [(r["actor"], r["via"], r["action"], r["outcome"]) for r in rows[2:]] == [
        ("vic", "console", "dlq.replay", "denied"),
        ("ada", "console", "dlq.replay", "ok"),
    ]
