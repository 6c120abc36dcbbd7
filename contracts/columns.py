"""Column types every package's tables share.

They live in `contracts`, the one package all table-defining packages may import
(`sagas` may not import `outbox`). `import contracts` does not load this module.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import DateTime
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator


def _utc(moment: datetime | None) -> datetime | None:
    # Everything compensa stores is UTC: a moment without an offset is UTC.
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """A moment stored in UTC and read back timezone-aware UTC, on SQLite as on PostgreSQL.

    SQLite keeps no offset and hands back naive datetimes; PostgreSQL's timestamptz hands
    back aware ones. The schema is `DateTime(timezone=True)` either way.
    """

    impl = DateTime
    cache_ok = True

    def __init__(self) -> None:
        super().__init__(timezone=True)

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return _utc(value)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return _utc(value)
