"""The simulator's inline SQLite engine behaves like the async engine where compensa relies on it."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select

from infra.sqlite_direct import create_direct_sqlite_engine

metadata = MetaData()
notes = Table("notes", metadata, Column("id", Integer, primary_key=True), Column("text", String, nullable=False))


@pytest.fixture
async def engine(tmp_path: Path):  # type: ignore[no-untyped-def]
    engine = create_direct_sqlite_engine(str(tmp_path / "direct.db"))
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    yield engine
    await engine.dispose()


async def count(engine) -> int:  # type: ignore[no-untyped-def]
    async with engine.connect() as connection:
        return (await connection.execute(select(func.count()).select_from(notes))).scalar_one()


async def test_engine_begin_commits_on_success_and_rolls_back_on_error(engine) -> None:  # type: ignore[no-untyped-def]
    async with engine.begin() as connection:
        await connection.execute(insert(notes).values(text="kept"))
    with pytest.raises(RuntimeError):
        async with engine.begin() as connection:
            await connection.execute(insert(notes).values(text="lost"))
            raise RuntimeError("handler failed")
    assert await count(engine) == 1


async def test_awaited_connect_and_begin_as_the_unit_of_work_uses_them(engine) -> None:  # type: ignore[no-untyped-def]
    connection = await engine.connect()
    await connection.begin()
    await connection.execute(insert(notes).values(text="rolled back"))
    assert connection.in_transaction()
    await connection.rollback()
    await connection.close()
    connection = await engine.connect()
    await connection.begin()
    await connection.execute(insert(notes), [{"text": "a"}, {"text": "b"}])
    await connection.commit()
    await connection.close()
    assert await count(engine) == 2


async def test_a_transaction_takes_the_write_lock_at_begin(engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import sqlite3

    async with engine.begin() as connection:
        await connection.execute(select(notes.c.id))
        other = sqlite3.connect(str(tmp_path / "direct.db"), timeout=0)
        try:
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        finally:
            other.close()


async def test_a_second_connection_while_one_is_open_is_refused(engine) -> None:  # type: ignore[no-untyped-def]
    # Both would share one sqlite3 connection: the second would end the first's transaction.
    async with engine.begin() as connection:
        await connection.execute(insert(notes).values(text="kept"))
        with pytest.raises(RuntimeError, match="one connection at a time"):
            await engine.connect()
    async with engine.connect() as connection:  # free again once closed
        assert (await connection.execute(select(func.count()).select_from(notes))).scalar_one() == 1
