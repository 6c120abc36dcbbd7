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


class CuttableLink:
    """A TCP link to a real server that a test can cut and restore.

    While cut, the port refuses connections and every open one is closed, which is what
    a client sees when the server is down; restoring listens on the same port again.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> CuttableLink:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        # Open connections first: from Python 3.12 on, wait_closed() waits for them.
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()
        await self._server.wait_closed()
        self._server = None

    async def restore(self) -> None:
        await self.start()

    async def close(self) -> None:
        if self._server is not None:
            await self.cut()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self._writers.add(client_writer)
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            self._writers.discard(client_writer)
            return
        if self._server is None:  # cut while connecting
            client_writer.close()
            server_writer.close()
            return
        self._writers.add(server_writer)

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()

        await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer))
        self._writers.difference_update((client_writer, server_writer))
