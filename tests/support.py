"""Helpers every ring of tests shares (each ring keeps its own in its `support.py`).

- ``eventually``: wait for a condition, never for a fixed time;
- ``CuttableLink``: a TCP link to a real server that a test can cut and restore;
- ``COMPENSA``, ``compensa(env, *args)``, ``assert_one_line_error``: the console script,
  run as an operator would;
- ``order_created``, ``short_event``, ``ledger_updated``, ``HOSTILE_EVENTS``, ``dump``:
  ingest request bodies, valid and hostile.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import shutil
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import strategies as st

from contracts import Money, OrderCreated, OrderLine

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


# ------------------------------------------------------------------ the console script

#: The console script next to the interpreter running the tests (the project's venv).
COMPENSA = shutil.which("compensa", path=str(Path(sys.executable).parent)) or "compensa"


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    @property
    def error_lines(self) -> list[str]:
        return self.stderr.strip().splitlines()


async def compensa(env: dict[str, str], *args: str, timeout: float = 60) -> Run:
    """Run `compensa *args` without blocking the event loop (consumers in the test keep running)."""
    process = await asyncio.create_subprocess_exec(
        COMPENSA, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return Run(process.returncode, stdout.decode(), stderr.decode())


def assert_one_line_error(run: Run, *fragments: str) -> str:
    """Exit 1, one `error:` line on stderr naming every fragment, no traceback anywhere."""
    assert run.returncode == 1, (run.returncode, run.stdout, run.stderr)
    assert "Traceback" not in run.stdout + run.stderr
    assert len(run.error_lines) == 1 and run.error_lines[0].startswith("error: "), run.stderr
    for fragment in fragments:
        assert fragment in run.error_lines[0], (fragment, run.error_lines[0])
    return run.error_lines[0]


# ------------------------------------------------------------------ ingest request bodies


def order_created(order_id: str = "o-1", amount: int = 3000, **overrides: Any) -> dict[str, Any]:
    """The JSON payload of a valid order.created."""
    payload = OrderCreated(
        order_id=order_id,
        customer_id="c-1",
        lines=(OrderLine(sku="SKU-1", quantity=2, unit_price=amount // 2),),
        total=Money(amount=amount, currency="EUR"),
        payment_token="tok_ok_1",
    ).model_dump(mode="json")
    payload.update(overrides)
    return payload


def short_event(order_id: str = "o-1", **overrides: Any) -> dict[str, Any]:
    return {"type": "order.created", "correlation_id": order_id, "payload": order_created(order_id), **overrides}


def ledger_updated(order_id: str = "o-1") -> dict[str, Any]:
    """A valid ledger.updated event in the short form. No work queue binds this type, so
    what these tests publish reaches only the test's own queue."""
    return {
        "type": "ledger.updated",
        "correlation_id": order_id,
        "payload": {
            "order_id": order_id,
            "transaction_id": f"capture:{order_id}",
            "postings": [
                {"account": "cash:EUR", "debit": 100, "credit": 0},
                {"account": "sales:EUR", "debit": 0, "credit": 100},
            ],
            "balances": {"cash:EUR": 100},
        },
    }


# ---------------------------------------------------------------- hostile JSON (hypothesis)


class RawJson(str):
    """JSON text written as is: numbers json.dumps cannot write, nesting built by hand."""


def dump(value: Any) -> str:
    """JSON text of `value`, with RawJson pieces as they are."""
    if isinstance(value, RawJson):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {dump(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(dump(v) for v in value) + "]"
    return json.dumps(value)  # ASCII: lone surrogates and NUL travel as \u escapes


WEIRD_CHARS = st.one_of(
    st.characters(),
    st.sampled_from(
        ["\x00", "\x1b", "\x7f", "\n", "\ud800", "\udbff", "\udc00", "\udfff", "\u2028", "\ufeff", "\U0001f600", '"', "\\"]
    ),
)
WEIRD_TEXT = st.text(WEIRD_CHARS, max_size=12)
WEIRD_NUMBERS = st.one_of(
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=2**70),
    st.integers(min_value=-(2**70), max_value=-(2**63) + 2),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=4_290, max_value=6_000).map(lambda n: RawJson("9" * n)),
    st.sampled_from(["1e999", "-1e999", "NaN", "Infinity", "-Infinity", "-0", "1E400", "0.1e-400"]).map(RawJson),
    st.integers(min_value=28, max_value=40).map(lambda n: RawJson("[" * n + "]" * n)),
    st.sampled_from([10_000, 50_000]).map(lambda n: RawJson('{"a":' * n + "0" + "}" * n)),
)
WEIRD_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), WEIRD_NUMBERS, WEIRD_TEXT),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(WEIRD_TEXT, children, max_size=4)),
    max_leaves=16,
)


def _leaf_paths(value: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict):
        return [at, *(p for k, v in value.items() for p in _leaf_paths(v, (*at, k)))]
    if isinstance(value, list):
        return [at, *(p for i, v in enumerate(value) for p in _leaf_paths(v, (*at, i)))]
    return [at]


_VALID = short_event("o-hyp")
_PATHS = [p for p in _leaf_paths(_VALID) if p]


def _replace(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replace(value[path[0]], path[1:], new)
    return copy


#: A valid event with one field (anywhere in it) replaced by something hostile, or any JSON at all.
HOSTILE_EVENTS = st.one_of(
    st.builds(_replace, st.just(_VALID), st.sampled_from(_PATHS), WEIRD_JSON),
    st.builds(lambda key, value: {**_VALID, key: value}, WEIRD_TEXT, WEIRD_JSON),
    WEIRD_JSON,
)


@contextlib.contextmanager
def contracts_of_apps_forgotten() -> Iterator[None]:
    """Forget the contracts that apps loaded in this process registered (`--app` registers them
    for the process; tests share one process, and the order app's catalogue is what others check)."""
    from contracts.envelope import REGISTRY

    before = set(REGISTRY)
    try:
        yield
    finally:
        REGISTRY.remove([model for model in REGISTRY if model not in before])
