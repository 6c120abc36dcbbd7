"""structlog JSON logs with bound saga/message ids and secrets redacted."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog
from opentelemetry import trace

_SECRET_KEY = re.compile(r"pass(word)?|secret|token|api[-_]?key|authorization|cookie|credential", re.I)
# `scheme://user:password@host`, the user possibly empty (`redis://:password@host`); the
# password runs to the last `@` before the path, so a password holding `@` is masked whole.
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://[^:/@\s]*:)(?P<password>[^/\s]*)@", re.I)
# A secret-looking query parameter (`?password=…`, `&api_key=…`) or libpq keyword (`password=…`).
_PARAM_SECRET = re.compile(
    r"(?P<name>(?:^|(?<=[?&;\s]))[^=&;?#\s]*(?:pass(?:word)?|secret|token|api[-_]?key|credential)[^=&;?#\s]*=)"
    r"(?P<value>[^&;#\s]+)",
    re.I,
)
REDACTED = "***"


def redact(value: Any, key: str | None = None) -> Any:
    """Mask values under secret-looking keys, passwords inside URLs and secret query parameters, recursively."""
    if key is not None and _SECRET_KEY.search(key):
        return REDACTED
    if isinstance(value, str):
        value = _URL_PASSWORD.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", value)
        return _PARAM_SECRET.sub(lambda m: f"{m.group('name')}{REDACTED}", value)
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact(v) for v in value)
    return value


def redact_secrets(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event_dict):
        event_dict[key] = redact(event_dict[key], key)
    return event_dict


def add_trace_context(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """`trace_id` and `span_id` of the active span, so a log line finds its trace."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event_dict.setdefault("trace_id", format(context.trace_id, "032x"))
        event_dict.setdefault("span_id", format(context.span_id, "016x"))
    return event_dict


def _current_stderr(*_args: Any) -> structlog.PrintLogger:
    # Whatever sys.stderr is when a logger is made, not when logging was configured: a
    # stream swapped in for a while (a CLI runner capturing output) may be closed later.
    return structlog.PrintLogger(sys.stderr)


def configure_logging(level: str = "INFO", fmt: str = "json", stream: Any = None) -> None:
    """Route structlog (and stdlib logging) to one stream as JSON lines or console text."""
    renderer: Any = structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            add_trace_context,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream) if stream else _current_stderr,
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=logging.WARNING, stream=stream or sys.stderr, format="%(levelname)s %(name)s %(message)s")
