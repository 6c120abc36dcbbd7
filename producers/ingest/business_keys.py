"""One saga per business key, checked at the edge: a second start for an order is a 409.

The saga refuses a second start too (dead-lettered as a business rule), which covers
two requests racing with the same new order id; this check answers the common case at
once and tells the producer why, instead of accepting an event that can only fail.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select, union
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts import Message
from outbox.tables import tables_for
from sagas.order_saga import ORDER_SAGA
from sagas.tables import saga_history

#: Event types that start a saga whose id is the event's correlation id.
SAGA_STARTS = frozenset({ORDER_SAGA.starts_with.message_type})

_INGEST = tables_for("ingest").outbox
_ORDERS = tables_for("orders").outbox


def duplicate_starts(messages: Sequence[Message[Any]]) -> list[str]:
    """Business keys started more than once within one request."""
    seen: set[str] = set()
    repeated = []
    for message in messages:
        if message.type in SAGA_STARTS:
            if message.correlation_id in seen:
                repeated.append(message.correlation_id)
            seen.add(message.correlation_id)
    return repeated


async def taken_keys(engine: AsyncEngine, messages: Sequence[Message[Any]]) -> set[str]:
    """Business keys of these start events that already have a saga or a start on its way.

    A start with the same message id is this very event again (a retry): not taken.
    """
    starts = [m for m in messages if m.type in SAGA_STARTS]
    if not starts:
        return set()
    keys = [m.correlation_id for m in starts]
    own_ids = [str(m.message_id) for m in starts]
    query = union(
        # A saga started by one of these very events (a retry of an accepted request) is no conflict:
        # its first history row names the message that started it.
        select(saga_history.c.saga_id.label("key")).where(
            saga_history.c.saga_id.in_(keys), saga_history.c.version == 1, saga_history.c.message_id.not_in(own_ids)
        ),
        *(
            select(outbox.c.correlation_id.label("key")).where(
                outbox.c.type.in_(SAGA_STARTS),
                outbox.c.correlation_id.in_(keys),
                outbox.c.message_id.not_in(own_ids),
            )
            for outbox in (_INGEST, _ORDERS)
        ),
    )
    async with engine.connect() as connection:
        return set((await connection.execute(query)).scalars())
