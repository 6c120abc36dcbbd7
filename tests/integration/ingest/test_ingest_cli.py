"""`compensa producers add|list|revoke` on a real database: the key is shown once, stored hashed."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from producers.ingest.tables import ingest_producers
from tests.support import COMPENSA, short_event

pytestmark = pytest.mark.integration


def compensa(engine: AsyncEngine, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COMPENSA_DATABASE_URL": engine.url.render_as_string(hide_password=False), **(extra_env or {})}
    return subprocess.run([COMPENSA, *args], env=env, capture_output=True, text=True, timeout=60)


async def test_add_prints_the_key_once_list_hides_it_revoke_locks_it_out(engine, make_client, tmp_path):
    added = compensa(engine, "producers", "add", "erp", "--types", "order.created,order.cancelled", "--rate-limit", "100")
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip()
    assert key.startswith("cpk_") and "shown once" in added.stderr and key not in added.stderr
    async with engine.connect() as connection:
        [row] = (await connection.execute(select(ingest_producers))).all()
    assert row.name == "erp" and json.loads(row.allowed_types) == ["order.cancelled", "order.created"] and row.rate_limit == 100
    assert key.split("_", 2)[2] not in json.dumps([str(v) for v in row])

    listed = compensa(engine, "producers", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [entry] = json.loads(listed.stdout)
    assert entry["name"] == "erp" and entry["key_id"] == row.key_id and entry["revoked_at"] is None
    assert key not in listed.stdout

    client = make_client(key)
    assert (await client.post("/v1/events", json=short_event())).status_code == 202
    revoked = compensa(engine, "producers", "revoke", "erp")
    assert revoked.returncode == 0 and "revoked 1" in revoked.stdout
    assert (await client.post("/v1/events", json=short_event("o-2"))).status_code == 401
    again = compensa(engine, "producers", "revoke", "erp")
    assert again.returncode == 1 and "no active key" in again.stderr

    refused = compensa(engine, "producers", "add", "erp", "--types", "stock.reserve")
    assert refused.returncode == 1 and "commands" in refused.stderr

    keys_file = tmp_path / "keys.json"
    filed = compensa(engine, "producers", "add", "crm", "--types", "order.created", "--file", str(keys_file))
    assert filed.returncode == 0 and filed.stdout.strip().split("_", 2)[2] not in keys_file.read_text()
    listed = compensa(engine, "producers", "list", "--json", extra_env={"COMPENSA_API_KEYS_FILE": str(keys_file)})
    assert {e["name"]: e["source"] for e in json.loads(listed.stdout)} == {"erp": "database", "crm": str(keys_file)}
