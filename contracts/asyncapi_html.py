"""Render an AsyncAPI 3.0 document as one self-contained HTML page (no scripts, no fetches).

The page shows the servers, every channel with its AMQP binding and queue arguments,
every operation, and every message with its headers, correlation id and payload, each
schema as a table of its properties and as JSON. Every value from the document is
escaped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from html import escape
from typing import Any

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1100px;padding:0 1.5em 4em;color:#1d2430}
h1{margin-top:1em}h2{border-bottom:2px solid #d8dee8;padding-bottom:.2em;margin-top:2em}
h3{margin:1.6em 0 .3em}code,pre{font:12.5px ui-monospace,monospace}
pre{background:#f5f7fa;padding:.8em;overflow:auto;border-radius:4px}
table{border-collapse:collapse;width:100%;margin:.4em 0 1em}
th,td{border:1px solid #d8dee8;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#eef2f7}.tag{display:inline-block;padding:0 .45em;border-radius:3px;font-size:12px;color:#fff}
.send{background:#2f7d4f}.receive{background:#2857a4}.muted{color:#5b6678}
nav a{margin-right:1em}details{margin:.3em 0 1em}
"""


def _anchor(kind: str, key: str) -> str:
    return escape(f"{kind}-{key}", quote=True)


def _link(kind: str, key: str, text: str | None = None) -> str:
    return f'<a href="#{_anchor(kind, key)}"><code>{escape(text if text is not None else key)}</code></a>'


def _ref_target(ref: str) -> tuple[str, str]:
    """`#/components/messages/x` → ("message", "x"); `#/channels/c/messages/m` → ("message", "m")."""
    parts = ref.lstrip("#/").split("/")
    if parts[:2] == ["components", "schemas"]:
        return "schema", parts[2]
    if parts[:2] == ["components", "messages"] or (parts[0] == "channels" and len(parts) == 4):
        return "message", parts[-1]
    if parts[0] == "channels":
        return "channel", parts[1]
    return "other", parts[-1]


def _resolve(document: Mapping[str, Any], value: Any) -> Any:
    """Follow `$ref`s inside the document (one object may be a chain of them)."""
    seen = 0
    while isinstance(value, Mapping) and "$ref" in value and seen < 16:
        node: Any = document
        for part in str(value["$ref"]).lstrip("#/").split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        value, seen = node, seen + 1
    return value


def _type_of(schema: Mapping[str, Any]) -> str:
    """A short type text of a property schema, linking referenced schemas."""
    if "$ref" in schema:
        kind, key = _ref_target(str(schema["$ref"]))
        return _link(kind, key)
    if "const" in schema:
        return f"<code>{escape(json.dumps(schema['const']))}</code>"
    if "anyOf" in schema:
        return " | ".join(_type_of(option) for option in schema["anyOf"])
    text = escape(str(schema.get("type", "any")))
    if schema.get("type") == "array" and isinstance(schema.get("items"), Mapping):
        text += " of " + _type_of(schema["items"])
    if isinstance(schema.get("additionalProperties"), Mapping):
        text += " of " + _type_of(schema["additionalProperties"])
    if "format" in schema:
        text += f" ({escape(str(schema['format']))})"
    return text


def _constraints(schema: Mapping[str, Any]) -> str:
    keys = ("minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems", "pattern", "enum")
    parts = [f"{key} {json.dumps(schema[key], ensure_ascii=False)}" for key in keys if key in schema]
    return escape("; ".join(parts))


def _properties_table(document: Mapping[str, Any], schema: Any) -> str:
    schema = _resolve(document, schema)
    if not isinstance(schema, Mapping):
        return ""
    properties = dict(schema.get("properties") or {})
    required = set(schema.get("required") or ())
    for part in schema.get("allOf") or ():
        inherited = _resolve(document, part)
        if isinstance(inherited, Mapping):
            properties = {**(inherited.get("properties") or {}), **properties}
            required |= set(inherited.get("required") or ())
    if not properties:
        return ""
    rows = [
        "<tr>"
        f"<td><code>{escape(name)}</code></td><td>{_type_of(prop)}</td>"
        f"<td>{'yes' if name in required else ''}</td>"
        f"<td>{escape(str(prop.get('description', '')))}</td><td>{_constraints(prop)}</td>"
        "</tr>"
        for name, prop in properties.items()
    ]
    head = "<tr><th>name</th><th>type</th><th>required</th><th>description</th><th>constraints</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def _json_block(value: Any, summary: str = "JSON") -> str:
    text = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)
    return f"<details><summary>{escape(summary)}</summary><pre>{escape(text)}</pre></details>"


def _table(head: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    header = "".join(f"<th>{escape(cell)}</th>" for cell in head)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{header}</tr>{body}</table>"


def _servers(document: Mapping[str, Any]) -> str:
    rows = [
        [
            f'<code id="{_anchor("server", name)}">{escape(name)}</code>',
            f"<code>{escape(str(server.get('host', '')))}</code>",
            escape(f"{server.get('protocol', '')} {server.get('protocolVersion', '')}".strip()),
            escape(str(server.get("description", ""))),
        ]
        for name, server in (document.get("servers") or {}).items()
    ]
    return "<h2 id='servers'>Servers</h2>" + _table(["server", "host", "protocol", "description"], rows)


def _channels(document: Mapping[str, Any]) -> str:
    parts = ["<h2 id='channels'>Channels</h2>"]
    for key, channel in (document.get("channels") or {}).items():
        amqp = (channel.get("bindings") or {}).get("amqp") or {}
        parts.append(f'<h3 id="{_anchor("channel", key)}">{escape(str(channel.get("title", key)))}</h3>')
        parts.append(f"<p>address <code>{escape(str(channel.get('address', '')))}</code>")
        if amqp.get("is") == "routingKey":
            exchange = amqp.get("exchange") or {}
            parts.append(
                f" · AMQP exchange <code>{escape(str(exchange.get('name', '')))}</code> ({escape(str(exchange.get('type', '')))})"
            )
        elif amqp.get("is") == "queue":
            parts.append(f" · AMQP queue <code>{escape(str((amqp.get('queue') or {}).get('name', '')))}</code>")
        parts.append(f"</p><p>{escape(str(channel.get('description', '')))}</p>")
        for name, parameter in (channel.get("parameters") or {}).items():
            values = ", ".join(f"<code>{escape(str(v))}</code>" for v in parameter.get("enum", ()))
            location = escape(str(parameter.get("location", "")))
            parts.append(f"<p>parameter <code>{escape(name)}</code> (from <code>{location}</code>): {values}</p>")
        arguments = channel.get("x-compensa-queue-arguments")
        if arguments:
            rows = [[f"<code>{escape(k)}</code>", f"<code>{escape(json.dumps(v))}</code>"] for k, v in arguments.items()]
            parts.append(_table(["queue argument", "value"], rows))
        links = ", ".join(_link("message", name) for name in channel.get("messages") or {})
        parts.append(f"<p>messages: {links}</p>")
    return "".join(parts)


def _operations(document: Mapping[str, Any]) -> str:
    rows = []
    for key, operation in (document.get("operations") or {}).items():
        action = str(operation.get("action", ""))
        _, channel = _ref_target(str((operation.get("channel") or {}).get("$ref", "")))
        messages = ", ".join(_link(*_ref_target(str(ref.get("$ref", "")))) for ref in operation.get("messages") or ())
        amqp = (operation.get("bindings") or {}).get("amqp") or {}
        binding = ", ".join(f"{k}={json.dumps(v)}" for k, v in amqp.items() if k != "bindingVersion")
        rows.append(
            [
                f'<code id="{_anchor("operation", key)}">{escape(key)}</code>',
                f'<span class="tag {escape(action, quote=True)}">{escape(action)}</span>',
                _link("channel", channel),
                escape(str(operation.get("summary", ""))),
                messages,
                f"<code>{escape(binding)}</code>",
            ]
        )
    return "<h2 id='operations'>Operations</h2>" + _table(
        ["operation", "action", "channel", "summary", "messages", "AMQP binding"], rows
    )


def _messages(document: Mapping[str, Any]) -> str:
    parts = ["<h2 id='messages'>Messages</h2>"]
    for key, message in ((document.get("components") or {}).get("messages") or {}).items():
        parts.append(f'<h3 id="{_anchor("message", key)}">{escape(str(message.get("title", key)))}</h3>')
        parts.append(f"<p>id <code>{escape(key)}</code> · name <code>{escape(str(message.get('name', '')))}</code>")
        parts.append(f" · content type <code>{escape(str(message.get('contentType', '')))}</code>")
        amqp = (message.get("bindings") or {}).get("amqp") or {}
        if amqp:
            parts.append(f" · AMQP type <code>{escape(str(amqp.get('messageType', '')))}</code>")
        parts.append("</p>")
        for field in ("summary", "description"):
            if message.get(field):
                parts.append(f"<p>{escape(str(message[field]))}</p>")
        correlation = _resolve(document, message.get("correlationId"))
        if isinstance(correlation, Mapping):
            parts.append(f"<p>correlation id: <code>{escape(str(correlation.get('location', '')))}</code></p>")
        for title, field in (("Headers", "headers"), ("Payload", "payload")):
            schema = message.get(field)
            if schema is None:
                continue
            target = f" ({_link(*_ref_target(schema['$ref']))})" if isinstance(schema, Mapping) and "$ref" in schema else ""
            parts.append(f"<h4>{title}{target}</h4>{_properties_table(document, schema)}")
    return "".join(parts)


def _schemas(document: Mapping[str, Any]) -> str:
    parts = ["<h2 id='schemas'>Schemas</h2>"]
    for key, schema in ((document.get("components") or {}).get("schemas") or {}).items():
        parts.append(f'<h3 id="{_anchor("schema", key)}"><code>{escape(key)}</code></h3>')
        if isinstance(schema, Mapping) and schema.get("description"):
            parts.append(f"<p>{escape(str(schema['description']))}</p>")
        parts.append(_properties_table(document, schema))
        parts.append(_json_block(schema))
    return "".join(parts)


def render_html(document: Mapping[str, Any]) -> str:
    """The whole document as one HTML page: styles inline, no script, no external resource."""
    info = document.get("info") or {}
    title = f"{info.get('title', 'AsyncAPI')} {info.get('version', '')}".strip()
    nav = "".join(
        f'<a href="#{section}">{section}</a>' for section in ("servers", "channels", "operations", "messages", "schemas")
    )
    body = "".join(
        [
            f"<h1>{escape(title)}</h1>",
            f"<p class='muted'>AsyncAPI {escape(str(document.get('asyncapi', '')))} · "
            f"default content type <code>{escape(str(document.get('defaultContentType', '')))}</code></p>",
            f"<p>{escape(str(info.get('description', '')))}</p>",
            f"<nav>{nav}</nav>",
            _servers(document),
            _channels(document),
            _operations(document),
            _messages(document),
            _schemas(document),
        ]
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)} — AsyncAPI</title><style>{_CSS}</style></head>"
        f"<body>{body}</body></html>\n"
    )
