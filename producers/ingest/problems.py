"""Error answers as RFC 9457 problem details (`application/problem+json`).

Every error the ingest API sends, its own refusals as well as the framework's (a
header that fails validation, 404, 405) and an unexpected exception (500), is one
`Problem`: `type`, `title`, `status`, `detail`, `instance` (the request's path) and,
for field errors, the extension member `errors`. A plain status has the type
``about:blank`` and the status phrase as title; a refusal a client may want to tell
apart from others with the same status has a ``urn:compensa:problem:<name>`` type
(a URN: the project owns no domain to put a URL on), listed in `PROBLEM_TYPES`.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema
from starlette.responses import Response

from producers.ingest.submission import FieldError

MEDIA_TYPE = "application/problem+json"
_URN = "urn:compensa:problem:"

#: The problem types this API sends besides ``about:blank``: name → (status, title).
PROBLEM_TYPES: dict[str, tuple[int, str]] = {
    "client-disconnected": (400, "Client disconnected"),
    "idempotency-key-missing": (400, "Idempotency-Key required"),
    "forbidden-event-type": (403, "Event type not allowed"),
    "request-in-progress": (409, "Request still in progress"),
    "already-started": (409, "Saga already started"),
    "invalid-request": (422, "Invalid request"),
    "idempotency-key-reused": (422, "Idempotency-Key reused"),
    "rate-limited": (429, "Rate limit exceeded"),
    "unavailable": (503, "Service unavailable"),
}


class Problem(BaseModel):
    """Why the request failed (RFC 9457); `errors` names each invalid field."""

    model_config = ConfigDict(extra="allow", title="Problem")

    type: str = Field(
        json_schema_extra={"format": "uri-reference"},
        description="`about:blank` (see `title`), or `urn:compensa:problem:<name>` for a refusal a client can act on.",
        examples=["urn:compensa:problem:rate-limited"],
    )
    title: str = Field(description="Short summary of the problem type.")
    status: int = Field(ge=400, le=599, description="The HTTP status code.")
    detail: str = Field(description="What went wrong with this request, for a human.")
    instance: str = Field(json_schema_extra={"format": "uri-reference"}, description="The request's path.")
    errors: list[FieldError] | SkipJsonSchema[None] = Field(
        default=None,
        description="Each invalid field (422 only): where (`loc`), what (`msg`), and a code (`type`).",
        # Absent when there are none, never null: the document says so.
        json_schema_extra=lambda schema: schema.pop("default", None),  # type: ignore[arg-type]
    )


def problem_type(name: str | None) -> str:
    return "about:blank" if name is None else _URN + name


def instance_of(path: str) -> str:
    """The request's path as a URI reference (whatever the client put into it)."""
    return quote(path, safe="/:@!$&'()*+,;=-._~")


def problem(
    status: int,
    detail: str,
    *,
    path: str,
    name: str | None = None,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """A problem+json response; `name` picks a type from `PROBLEM_TYPES`, else ``about:blank``."""
    if name is not None:
        documented_status, title = PROBLEM_TYPES[name]
        if documented_status != status:
            raise ValueError(f"problem {name!r} is a {documented_status}, not a {status}")
    else:
        title = HTTPStatus(status).phrase
    body: dict[str, Any] = {
        "type": problem_type(name),
        "title": title,
        "status": status,
        "detail": detail,
        "instance": instance_of(path),
    }
    if errors is not None:
        body["errors"] = errors
    # ASCII JSON: a detail that quotes the client's text (a lone surrogate, say) is
    # escaped, never an encoding error on the way out.
    content = json.dumps(body, ensure_ascii=True, default=str)
    return Response(content, status_code=status, headers=headers, media_type=MEDIA_TYPE)


def summary(errors: list[dict[str, Any]]) -> str:
    """The `detail` of a 422 with field errors: how many, and the first."""
    first = errors[0]
    where = ".".join(str(part) for part in first.get("loc", []))
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg', '')}{more}"
