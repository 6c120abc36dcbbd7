"""Generate JSON Schema for every message and an AsyncAPI document from the contracts."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from contracts.envelope import REGISTRY, Envelope, Registry
from contracts.messages import Payload
from contracts.routing import exchange_for


def schema_name(model: type[Payload]) -> str:
    return f"{model.message_type}.v{model.message_version}"


def message_schema(model: type[Payload]) -> dict[str, Any]:
    """The JSON Schema of a full message: the envelope with this payload."""
    envelope = Envelope.model_json_schema()
    payload = model.model_json_schema(ref_template="#/$defs/{model}")
    defs = {**envelope.pop("$defs", {}), **payload.pop("$defs", {})}
    envelope["properties"]["type"] = {"const": model.message_type, "type": "string"}
    envelope["properties"]["version"] = {"const": model.message_version, "type": "integer"}
    envelope["properties"]["payload"] = payload
    envelope["title"] = f"{model.message_type} v{model.message_version} ({model.kind})"
    envelope["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    envelope["$id"] = f"https://compensa.dev/schemas/{schema_name(model)}.json"
    if defs:
        envelope["$defs"] = defs
    return envelope


def json_schemas(registry: Registry = REGISTRY) -> dict[str, dict[str, Any]]:
    return {schema_name(model): message_schema(model) for model in registry}


def payload_schemas(
    registry: Registry = REGISTRY, *, kind: str | None = None, ref_prefix: str = "#/$defs/"
) -> dict[str, dict[str, Any]]:
    """The JSON Schemas of the payloads alone, for a document's shared definitions.

    A payload is keyed by its `schema_name` (``order.created.v1``), a model it uses by
    its class name (``Money``); references point to `ref_prefix` + key, so
    ``"#/components/schemas/"`` makes them OpenAPI components. `kind` keeps only events
    or only commands.
    """
    schemas: dict[str, dict[str, Any]] = {}
    for model in registry:
        if kind is not None and model.kind != kind:
            continue
        schema = _closed_keys(model.model_json_schema(ref_template=ref_prefix + "{model}"))
        for name, definition in schema.pop("$defs", {}).items():
            if schemas.setdefault(name, definition) != definition:
                raise ValueError(f"two different models are named {name!r}")
        schemas[schema_name(model)] = schema
    return schemas


def _closed_keys(schema: Any) -> Any:
    """Say in `propertyNames` what a mapping's keys must match, as the model enforces.

    Pydantic writes ``dict[Identifier, int]`` as ``patternProperties``, which leaves a key
    outside the pattern free in JSON Schema while the model refuses it; a generator
    working from the schema would produce such keys.
    """
    if isinstance(schema, list):
        return [_closed_keys(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {key: _closed_keys(value) for key, value in schema.items()}
    patterns = schema.get("patternProperties")
    if isinstance(patterns, dict) and len(patterns) == 1 and "additionalProperties" not in schema and "properties" not in schema:
        [(pattern, values)] = patterns.items()
        del schema["patternProperties"]
        schema["propertyNames"] = {**schema.get("propertyNames", {}), "pattern": pattern}
        schema["additionalProperties"] = values
    return schema


def asyncapi(
    queues: Iterable[tuple[str, str, Iterable[str]]],
    registry: Registry = REGISTRY,
    version: str = "0.1.0",
) -> dict[str, Any]:
    """An AsyncAPI 3.0 document: one channel per message type, one operation per consumer queue.

    `queues` are (queue name, exchange name, routing keys) triples from the topology.
    """
    channels: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    for model in registry:
        key = schema_name(model).replace(".", "_")
        schemas[key] = message_schema(model)
        messages[key] = {
            "name": model.message_type,
            "title": schemas[key]["title"],
            "contentType": "application/json",
            "payload": {"$ref": f"#/components/schemas/{key}"},
            "bindings": {"amqp": {"deliveryMode": 2, "messageType": model.message_type}},
        }
        channels[key] = {
            "address": model.message_type,
            "messages": {key: {"$ref": f"#/components/messages/{key}"}},
            "bindings": {
                "amqp": {
                    "is": "routingKey",
                    "exchange": {
                        "name": exchange_for(model.kind),
                        "type": "topic" if model.kind == "event" else "direct",
                        "durable": True,
                        "autoDelete": False,
                    },
                }
            },
        }
    operations: dict[str, Any] = {}
    by_type = {model.message_type: schema_name(model).replace(".", "_") for model in registry}
    for queue, _exchange, keys in queues:
        for routing_key in keys:
            key = by_type[routing_key]
            operations[f"{queue}__{key}"] = {
                "action": "receive",
                "channel": {"$ref": f"#/channels/{key}"},
                "bindings": {"amqp": {"ack": True}},
                "summary": f"{queue} consumes {routing_key}",
            }
    for model in registry:
        key = by_type[model.message_type]
        operations[f"publish__{key}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{key}"},
            "summary": f"published through the transactional outbox ({model.kind})",
        }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "compensa",
            "version": version,
            "description": "Order saga messages on RabbitMQ. Every queue dead-letters to compensa.dlx.",
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }


def describe(registry: Registry = REGISTRY) -> Mapping[str, str]:
    return {model.message_type: model.kind for model in registry}
