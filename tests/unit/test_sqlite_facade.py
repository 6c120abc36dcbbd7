"""The simulator's inline SQLite engine behaves like the async engine where compensa relies on it."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    bindparam,
    delete,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError

from infra.db import create_engine
from infra.simulation.sqlite_facade import create_direct_sqlite_engine

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


# --- the same answers as the async engine ----------------------------------------------

typed = Table(
    "typed",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String, nullable=False, unique=True),
    Column("at", DateTime(timezone=True)),
    Column("amount", Numeric(12, 2)),
    Column("flag", Boolean),
    Column("data", JSON),
)

ROWS = [
    {
        "name": "a",
        "at": datetime(2026, 1, 2, 3, 4, 5, 600000, tzinfo=UTC),
        "amount": Decimal("12.34"),
        "flag": True,
        "data": {"k": [1, 2]},
    },
    {"name": "b", "at": datetime(2026, 2, 3, 4, 5, 6, tzinfo=UTC), "amount": Decimal("0.10"), "flag": False, "data": None},
    {"name": "c", "at": None, "amount": None, "flag": None, "data": ["x"]},
]

pick = select(typed).where(typed.c.name.in_(bindparam("names", expanding=True))).order_by(typed.c.id)
rename = update(typed).where(typed.c.name == bindparam("old")).values(name=bindparam("new"))


async def run_statements(engine) -> list[object]:  # type: ignore[no-untyped-def]
    """Every statement shape compensa runs, with what each one answers."""
    answers: list[object] = []
    async with engine.begin() as connection:
        answers.append((await connection.execute(insert(typed), ROWS)).rowcount)
        answers.append((await connection.execute(sqlite_insert(typed).on_conflict_do_nothing(), {"name": "a"})).rowcount)
        answers.append([tuple(row) for row in await connection.execute(pick, {"names": ["c", "a"]})])
        # IN lists of other lengths, then of a length seen before with other values.
        for names in (["a"], ["b", "c"], [], ["b"], ["a", "b"], ["zz"]):
            answers.append([row.name for row in await connection.execute(pick, {"names": names})])
        answers.append([row._asdict() for row in (await connection.execute(select(typed).where(typed.c.flag.is_(True)))).all()])
        answers.append((await connection.execute(rename, [{"old": "a", "new": "a2"}, {"old": "zz", "new": "z"}])).rowcount)
        answers.append((await connection.execute(select(func.count(), func.min(typed.c.at)).select_from(typed))).one())
        answers.append(
            (
                await connection.execute(
                    update(typed)
                    .where(typed.c.name == "b")
                    .values(amount=typed.c.amount + Decimal("1.00"))
                    .returning(typed.c.amount)
                )
            ).scalar_one()
        )
        answers.append(list((await connection.execute(select(typed.c.name).order_by(typed.c.name))).scalars()))
        answers.append((await connection.execute(delete(typed).where(typed.c.name.in_(["b", "c"])))).rowcount)
        answers.append(await connection.scalar(select(typed.c.data).where(typed.c.name == "a2")))
        answers.append([tuple(row) for row in await connection.execute(text("SELECT name, amount FROM typed"))])
    return answers


async def test_the_facade_answers_like_the_async_engine(tmp_path: Path) -> None:
    """Every statement shape, on the facade and on the aiosqlite engine production uses."""
    results = []
    for engine in (
        create_direct_sqlite_engine(str(tmp_path / "direct-answers.db")),
        create_engine(f"sqlite+aiosqlite:///{tmp_path / 'async-answers.db'}"),
    ):
        async with engine.begin() as connection:
            await connection.run_sync(metadata.create_all)
        results.append(await run_statements(engine))
        await engine.dispose()
    direct, through_asyncio = results
    assert direct == through_asyncio
    assert direct[3:9] == [["a"], ["b", "c"], [], ["b"], ["a", "b"], []]
    assert direct[2][0][2] == datetime(2026, 1, 2, 3, 4, 5, 600000)  # typed values, not strings
    assert direct[12] == Decimal("1.10")


async def test_a_failing_statement_raises_sqlalchemys_error_and_rolls_back(engine) -> None:  # type: ignore[no-untyped-def]
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    with pytest.raises(IntegrityError):  # the pipeline retries these: the class matters
        async with engine.begin() as connection:
            await connection.execute(insert(notes).values(text="lost"))
            await connection.execute(insert(notes), {"id": 1, "text": None})
    assert await count(engine) == 0


async def test_a_statement_outside_a_transaction_opens_one_and_close_rolls_it_back(engine) -> None:  # type: ignore[no-untyped-def]
    async with engine.connect() as connection:
        await connection.execute(insert(notes).values(text="never committed"))
        assert connection.in_transaction()
    assert await count(engine) == 0
    async with engine.connect() as connection:
        await connection.execute(insert(notes).values(text="committed"))
        await connection.commit()
    assert await count(engine) == 1


async def test_driver_sql_shares_the_transaction(engine) -> None:  # type: ignore[no-untyped-def]
    # exec_driver_sql and Core statements run in one transaction; commit and rollback end it.
    async with engine.begin() as connection:
        await connection.execute(insert(notes).values(text="core"))
        await connection.exec_driver_sql("INSERT INTO notes (text) VALUES ('driver sql')")
    with pytest.raises(RuntimeError):
        async with engine.begin() as connection:
            await connection.exec_driver_sql("INSERT INTO notes (text) VALUES ('rolled back')")
            await connection.execute(insert(notes).values(text="rolled back too"))
            raise RuntimeError
    assert await count(engine) == 2
    async with engine.begin() as connection:  # no transaction left over in either layer
        await connection.execute(insert(notes).values(text="third"))
    assert await count(engine) == 3


async def test_a_throwaway_engine_keeps_other_connections_out_and_still_rolls_back(tmp_path: Path) -> None:
    import sqlite3

    path = str(tmp_path / "throwaway.db")
    engine = create_direct_sqlite_engine(path, throwaway=True)
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    async with engine.begin() as connection:
        await connection.execute(insert(notes).values(text="mine"))
    with pytest.raises(RuntimeError):
        async with engine.begin() as connection:
            await connection.execute(insert(notes).values(text="rolled back"))
            raise RuntimeError
    assert await count(engine) == 1
    other = sqlite3.connect(path, timeout=0)
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("SELECT count(*) FROM notes").fetchall()
        await engine.dispose()  # closing the engine lets go of the file
        assert other.execute("SELECT count(*) FROM notes").fetchall() == [(1,)]
    finally:
        other.close()
