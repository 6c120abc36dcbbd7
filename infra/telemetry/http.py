"""The ingest API's server span and request metrics, as a plain ASGI middleware.

The span is the root of a saga's trace when an upstream system sends no
``traceparent``, and a child of theirs when it does; what the request writes to the
outbox carries it on. The route label is the route's template (``/v1/events``), the
producer the authenticated one (the app leaves its name in ``request.state``):
label values stay a closed set.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from opentelemetry import trace

from infra.telemetry import instruments
from outbox.tracing import context_from

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

tracer = trace.get_tracer("compensa")

#: Where the app leaves the authenticated producer's name (`request.state.producer`).
PRODUCER_STATE = "producer"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


class RequestTelemetry:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        method = scope.get("method", "GET")
        status = 500
        replayed = False

        async def send_and_watch(message: Message) -> None:
            nonlocal status, replayed
            if message["type"] == "http.response.start":
                status = int(message["status"])
                replayed = any(k.lower() == b"idempotent-replayed" for k, _ in message.get("headers", ()))
            await send(message)

        context = context_from(_header(scope, b"traceparent"), {"tracestate": _header(scope, b"tracestate") or ""})
        with tracer.start_as_current_span(
            method,
            context=context,
            kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": scope.get("path", ""), "url.scheme": scope.get("scheme", "")},
        ) as span:
            try:
                await self.app(scope, receive, send_and_watch)
            finally:
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                producer = str(scope.get("state", {}).get(PRODUCER_STATE, ""))
                span.update_name(f"{method} {route}")
                span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(trace.Status(trace.StatusCode.ERROR))
                instruments.api_requests.add(1, {"route": route, "status_code": str(status), "producer": producer})
                instruments.api_request_duration.record(time.perf_counter() - started, {"route": route})
                if status == 429:
                    instruments.api_rate_limited.add(1, {"producer": producer})
                if replayed:
                    instruments.api_idempotent_replays.add(1, {"producer": producer})
