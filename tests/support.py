"""Small helpers shared by tests."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "condition not met",
) -> T:
    """Poll a sync or async predicate until it returns something truthy, and return that.

    Asynchronous effects (a relay publishing, a consumer committing) are awaited by
    polling rather than by fixed sleeps: fast when things work, bounded when they do not.
    An AssertionError raised by the predicate counts as "not yet"; after ``timeout``
    seconds this raises AssertionError with ``message`` and the last result or failure.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            last = f"last result: {result!r}"
            if result:
                return result  # type: ignore[return-value]
        except AssertionError as error:
            last = f"last failure: {error}"
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise AssertionError(f"{message} within {timeout}s ({last})")
        await asyncio.sleep(min(interval, remaining))
