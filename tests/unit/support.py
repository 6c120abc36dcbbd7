"""Helpers for the CLI's tests over SQLite: invoke a command, read its output, store hostile rows."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from typing import Any

from typer.testing import CliRunner

from infra.cli.main import app
from infra.settings import get_settings

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

runner = CliRunner()


def cli(*args: str, input: str | None = None) -> Any:  # noqa: A002 - CliRunner.invoke's name
    get_settings.cache_clear()
    return runner.invoke(app, list(args), input=input)


def one_line_error(result: Any, *fragments: str) -> str:
    """Assert exit 1 with a single `error:` line on stderr naming every fragment."""
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


#: Ids an operator copies from a listing into the next command, with what breaks terminals.
NASTY_IDS = ("[/]", "[bold red]x", "\x1b[31mred", "3f2a9c1e-8d4b-4e6a-9b1c-2d3e4f5a6b7c")


def store_rows(*, sagas: tuple[str, ...] = (), letters: tuple[str, ...] = ()) -> dict[str, int]:
    """Insert saga rows (with one transition each) and dead letters as stored, unvalidated; dead-letter id per saga id."""
    from sqlalchemy import insert

    from infra.db import create_engine
    from infra.dlq.tables import dead_letters
    from sagas.tables import saga_history, saga_instances

    async def insert_all() -> dict[str, int]:
        engine = create_engine(get_settings().database_url)
        ids = {}
        try:
            async with engine.begin() as connection:
                for saga_id in sagas:
                    await connection.execute(
                        insert(saga_instances).values(
                            saga_id=saga_id,
                            definition="order",
                            status="running",
                            step=0,
                            data="{}",
                            done_steps="[]",
                            pending_compensations="[]",
                            compensation_attempts=0,
                            reason=f"held by [bold]{saga_id}",
                            version=1,
                            started_at=NOW,
                            updated_at=NOW,
                        )
                    )
                    await connection.execute(
                        insert(saga_history).values(
                            saga_id=saga_id,
                            version=1,
                            at=NOW,
                            trigger="order.created",
                            message_id="m-[/]",
                            causation_id=None,
                            from_status=None,
                            to_status="running",
                            step=None,
                            note="note [/] \x1b[2J",
                            sent=json.dumps([{"type": "stock.reserve[/]", "message_id": "m-2"}]),
                        )
                    )
                for n, saga_id in enumerate(letters):
                    result = await connection.execute(
                        insert(dead_letters)
                        .values(
                            dedup_key=uuid.uuid4().hex,
                            queue="stock.commands",
                            dlq="stock.commands.dlq",
                            message_id=f"m-{n}[/]",
                            type=f"stock.reserve[/]\x1b[31m{n}",
                            version=1,
                            saga_id=saga_id,
                            reason_class=f"handler_error[bold]{n}",
                            reason=f"RuntimeError: [/] disk [bold red]full\x1b[31m {'x' * 120}",
                            attempts=2,
                            original_exchange="compensa.commands[/]",
                            original_routing_key="stock.reserve\x1b[0m",
                            first_failure_at=NOW,
                            last_failure_at=NOW,
                            body=json.dumps({"payload": {"order_id": saga_id, "note": "[/]\x9b"}}),
                            body_encoding="utf-8",
                            headers=json.dumps({"x-[/]": "v[bold]\x1b[31m"}),
                            archived_at=NOW,
                            status="new",
                        )
                        .returning(dead_letters.c.id)
                    )
                    ids[saga_id] = result.scalar_one()
        finally:
            await engine.dispose()
        return ids

    get_settings.cache_clear()
    return asyncio.run(insert_all())


def assert_rendered(result: Any, width: int | None = None) -> str:
    """Exit 0, no traceback, no raw control character, and (when given) no line wider than `width`."""
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr, result.exception)
    output = result.stdout + result.stderr
    assert "Traceback" not in output and "MarkupError" not in output
    assert not [ch for ch in output if not ch.isprintable() and ch != "\n"], output
    if width is not None:
        table_lines = [line for line in result.stdout.splitlines() if line[:1] in "┏┃┡│└"]
        assert table_lines and all(len(line) <= width for line in table_lines), result.stdout
    return result.stdout


def table_cells(stdout: str, header: str) -> list[str]:
    """The cells of one column of a Rich table, one per row (rows are one line each)."""
    lines = stdout.splitlines()
    headers = [h.strip() for h in next(line for line in lines if line.startswith("┃")).split("┃")[1:-1]]
    column = headers.index(header)
    return [line.split("│")[column + 1].strip() for line in lines if line.startswith("│")]
