"""Generate JSON Schema for every message and an AsyncAPI document from the contracts."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
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


#: The AMQP bindings' version the document uses (AsyncAPI 3.0 goes with 0.3.0).
AMQP_BINDING_VERSION = "0.3.0"
#: AMQP delivery mode 2: the broker writes the message to disk (every compensa publish).
PERSISTENT = 2
#: The runtime expression of the saga id: the envelope's correlation_id (also the AMQP
#: correlation-id property).
CORRELATION_ID_LOCATION = "$message.payload#/correlation_id"


@dataclass(frozen=True)
class AmqpExchange:
    """An exchange of the topology, as the AsyncAPI document shows it."""

    name: str
    type: str  # "topic" | "direct"
    description: str


@dataclass(frozen=True)
class AmqpQueue:
    """A queue, what it is for and which messages it holds.

    `role` is ``work`` (a service consumes it), ``delay`` (retries wait out their TTL
    there, then the broker dead-letters them back to `returns_to`) or ``dead_letter``
    (the DLQ of `returns_to`, archived by the dlq service). `message_types` are the
    types it can hold; `bound_to` and `routing_keys` say how messages reach it
    (``None``: published to it by name through the default exchange).
    """

    name: str
    role: str
    service: str
    message_types: tuple[str, ...]
    bound_to: str | None
    routing_keys: tuple[str, ...]
    arguments: Mapping[str, Any]
    returns_to: str | None = None
    delay_ms: int | None = None


@dataclass(frozen=True)
class AmqpTopology:
    """What the AsyncAPI document describes: servers, exchanges, queues and headers.

    `headers` maps each AMQP header name to its JSON Schema (with a description);
    `dead_letter_headers` are those every dead letter carries.
    """

    servers: Mapping[str, tuple[str, str]]  # name -> (host:port, description)
    exchanges: tuple[AmqpExchange, ...]
    dead_letter_exchange: AmqpExchange
    queues: tuple[AmqpQueue, ...]
    headers: Mapping[str, Mapping[str, Any]]
    dead_letter_headers: tuple[str, ...]


def message_key(model: type[Payload]) -> str:
    """The AsyncAPI id of a message (``order_created_v1``)."""
    return schema_name(model).replace(".", "_")


def dead_letter_key(model: type[Payload]) -> str:
    """The AsyncAPI id of a message's dead-lettered copy (``order_created_v1_dead_letter``)."""
    return message_key(model) + "_dead_letter"


def _components_schemas(registry: Registry) -> dict[str, Any]:
    """Every payload, its envelope and the models they use, referencing each other in components."""
    ref = "#/components/schemas/"
    schemas = payload_schemas(registry, ref_prefix=ref)
    envelope = Envelope.model_json_schema(ref_template=ref + "{model}")
    for name, definition in envelope.pop("$defs", {}).items():
        if schemas.setdefault(name, definition) != definition:
            raise ValueError(f"two different models are named {name!r}")
    for model in registry:
        body = json.loads(json.dumps(envelope))
        body["title"] = f"{model.message_type} v{model.message_version} ({model.kind})"
        body["properties"]["type"] = {"const": model.message_type, "type": "string", "description": "Also the routing key."}
        body["properties"]["version"] = {"const": model.message_version, "type": "integer"}
        body["properties"]["payload"] = {"$ref": ref + schema_name(model)}
        schemas[schema_name(model) + ".envelope"] = body
    return schemas


def _headers_schemas(topology: AmqpTopology) -> dict[str, Any]:
    headers = {
        "type": "object",
        "description": (
            "AMQP headers. `traceparent` travels from the producer (W3C trace context); the "
            "x-compensa-* headers are added when a consumer retries or dead-letters a message. "
            "The broker may add its own (x-death, x-first-death-*): other headers are allowed."
        ),
        "properties": {name: dict(schema) for name, schema in topology.headers.items()},
    }
    dead_letter = {
        "description": "AMQP headers of a dead letter: why, where from, how often, since when.",
        "allOf": [{"$ref": "#/components/schemas/MessageHeaders"}],
        "type": "object",
        "required": list(topology.dead_letter_headers),
    }
    return {"MessageHeaders": headers, "DeadLetterHeaders": dead_letter}


def _message(model: type[Payload], *, dead_letter: bool) -> dict[str, Any]:
    summary = (model.__doc__ or "").strip().splitlines()[0] if model.__doc__ else ""
    message: dict[str, Any] = {
        "name": model.message_type,
        "title": f"{model.message_type} v{model.message_version} ({model.kind})" + (", dead-lettered" if dead_letter else ""),
        "contentType": "application/json",
        "headers": {"$ref": "#/components/schemas/" + ("DeadLetterHeaders" if dead_letter else "MessageHeaders")},
        "payload": {"$ref": f"#/components/schemas/{schema_name(model)}.envelope"},
        "correlationId": {"$ref": "#/components/correlationIds/sagaId"},
        "bindings": {"amqp": {"messageType": model.message_type, "bindingVersion": AMQP_BINDING_VERSION}},
    }
    if summary and not summary.startswith("Base of"):
        message["summary"] = summary
    if dead_letter:
        message["description"] = (
            f"A {model.message_type} a consumer gave up on: the same body and properties, "
            "with the dead-letter headers saying why."
        )
    return message


def _exchange_channel(
    exchange: AmqpExchange, parameter: str, values: list[str], location: str, description: str
) -> dict[str, Any]:
    return {
        "address": "{" + parameter + "}",
        "title": f"exchange {exchange.name}",
        "description": f"{exchange.description} {description}",
        "parameters": {parameter: {"enum": values, "description": description, "location": location}},
        "messages": {},
        "bindings": {
            "amqp": {
                "is": "routingKey",
                "exchange": {"name": exchange.name, "type": exchange.type, "durable": True, "autoDelete": False, "vhost": "/"},
                "bindingVersion": AMQP_BINDING_VERSION,
            }
        },
    }


def _queue_description(queue: AmqpQueue) -> str:
    if queue.role == "work":
        keys = ", ".join(queue.routing_keys)
        return (
            f"Work queue of the {queue.service} service, bound to {queue.bound_to} with {keys}. "
            f"A failure it gives up on is dead-lettered through the DLX to {queue.name}.dlq."
        )
    if queue.role == "delay":
        return (
            f"Delay queue of {queue.returns_to}: a transient failure waits here (TTL {queue.delay_ms} ms, "
            f"message expiration at most that), then the broker dead-letters it back to {queue.returns_to} "
            "through the default exchange."
        )
    return (
        f"Dead-letter queue of {queue.returns_to}, bound to {queue.bound_to} with {', '.join(queue.routing_keys)}. "
        "The dlq service archives each message into the dead_letters table (ack after commit)."
    )


def asyncapi(topology: AmqpTopology, registry: Registry = REGISTRY, version: str = "0.1.0") -> dict[str, Any]:
    """An AsyncAPI 3.0 document of the broker topology and every message.

    Channels: each exchange (its address is the routing key, one of the channel's
    parameter values), each work, delay and dead-letter queue. Operations: publishing
    each message, each service consuming its queue, retrying through a delay queue,
    dead-lettering, replaying from the archive, and archiving each DLQ.
    """
    models = {model.message_type: model for model in registry}
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for model in registry:
        messages[message_key(model)] = _message(model, dead_letter=False)
        messages[dead_letter_key(model)] = _message(model, dead_letter=True)

    def channel_messages(channel: str, types: Iterable[str], *, dead_letter: bool) -> list[dict[str, str]]:
        keys = [(dead_letter_key if dead_letter else message_key)(models[t]) for t in types]
        for key in keys:
            channels[channel]["messages"][key] = {"$ref": f"#/components/messages/{key}"}
        return [{"$ref": f"#/channels/{channel}/messages/{key}"} for key in keys]

    work_queues = [q for q in topology.queues if q.role == "work"]
    for exchange in topology.exchanges:
        types = [m.message_type for m in registry if exchange_for(m.kind) == exchange.name]
        channels[exchange.name] = _exchange_channel(
            exchange, "routingKey", types, "$message.payload#/type", "The routing key is the message type."
        )
        for message_type in types:
            model = models[message_type]
            [ref] = channel_messages(exchange.name, [message_type], dead_letter=False)
            operations[f"publish.{message_type}"] = {
                "action": "send",
                "channel": {"$ref": f"#/channels/{exchange.name}"},
                "messages": [ref],
                "title": f"publish {message_type}",
                "summary": f"Published through the transactional outbox ({model.kind}), with publisher confirms.",
                "bindings": {
                    "amqp": {
                        "deliveryMode": PERSISTENT,
                        # A command must reach its queue; an event may have no consumer yet.
                        "mandatory": model.kind == "command",
                        "bindingVersion": AMQP_BINDING_VERSION,
                    }
                },
            }
    dlx = topology.dead_letter_exchange
    channels[dlx.name] = _exchange_channel(
        dlx,
        "queue",
        [q.name for q in work_queues],
        "$message.header#/x-compensa-original-queue",
        "The routing key is the name of the work queue the message failed in.",
    )
    for queue in topology.queues:
        channels[queue.name] = {
            "address": queue.name,
            "title": f"{queue.role.replace('_', '-')} queue {queue.name}",
            "description": _queue_description(queue),
            "messages": {},
            "bindings": {
                "amqp": {
                    "is": "queue",
                    "queue": {"name": queue.name, "durable": True, "exclusive": False, "autoDelete": False, "vhost": "/"},
                    "bindingVersion": AMQP_BINDING_VERSION,
                }
            },
            "x-compensa-queue-arguments": dict(queue.arguments),
        }
        refs = channel_messages(queue.name, queue.message_types, dead_letter=queue.role == "dead_letter")
        if queue.role == "work":
            operations[f"consume.{queue.name}"] = {
                "action": "receive",
                "channel": {"$ref": f"#/channels/{queue.name}"},
                "messages": refs,
                "title": f"{queue.service} consumes {queue.name}",
                "summary": (
                    "Acknowledged only after the effect and the inbox row are committed; a duplicate is acked and skipped."
                ),
                "bindings": {"amqp": {"ack": True, "bindingVersion": AMQP_BINDING_VERSION}},
            }
            operations[f"replay.{queue.name}"] = {
                "action": "send",
                "channel": {"$ref": f"#/channels/{queue.name}"},
                "messages": refs,
                "title": f"replay into {queue.name}",
                "summary": "`compensa dlq replay` publishes an archived dead letter to its queue by name (default exchange).",
                "bindings": {"amqp": {"deliveryMode": PERSISTENT, "mandatory": True, "bindingVersion": AMQP_BINDING_VERSION}},
            }
            dlx_refs = channel_messages(dlx.name, queue.message_types, dead_letter=True)
            operations[f"dead_letter.{queue.name}"] = {
                "action": "send",
                "channel": {"$ref": f"#/channels/{dlx.name}"},
                "messages": dlx_refs,
                "title": f"dead-letter from {queue.name}",
                "summary": (
                    f"A permanent failure, or a transient one past the last attempt, in {queue.name}: "
                    f"published to {dlx.name} with routing key {queue.name}, then acked."
                ),
                "bindings": {"amqp": {"deliveryMode": PERSISTENT, "mandatory": True, "bindingVersion": AMQP_BINDING_VERSION}},
            }
        elif queue.role == "delay":
            operations[f"retry.{queue.name}"] = {
                "action": "send",
                "channel": {"$ref": f"#/channels/{queue.name}"},
                "messages": refs,
                "title": f"retry {queue.returns_to} after {queue.delay_ms} ms",
                "summary": (
                    f"A transient failure in {queue.returns_to}: a copy with the attempt header goes to "
                    "this delay queue by name (default exchange), then the delivery is acked."
                ),
                "bindings": {
                    "amqp": {
                        "deliveryMode": PERSISTENT,
                        "mandatory": True,
                        # Jittered per message, never above the queue's TTL.
                        "expiration": queue.delay_ms,
                        "bindingVersion": AMQP_BINDING_VERSION,
                    }
                },
            }
        else:
            operations[f"archive.{queue.name}"] = {
                "action": "receive",
                "channel": {"$ref": f"#/channels/{queue.name}"},
                "messages": refs,
                "title": f"dlq archives {queue.name}",
                "summary": "Each dead letter becomes a dead_letters row; acked after the commit.",
                "bindings": {"amqp": {"ack": True, "bindingVersion": AMQP_BINDING_VERSION}},
            }
    servers = {
        name: {
            "host": host,
            "protocol": "amqp",
            "protocolVersion": "0.9.1",
            "description": description,
            "security": [{"$ref": "#/components/securitySchemes/brokerUser"}],
        }
        for name, (host, description) in topology.servers.items()
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "compensa",
            "version": version,
            "description": (
                "The order saga's messages on RabbitMQ. Every message is a JSON envelope (its `type` is the "
                "routing key and the AMQP type, its `message_id` the AMQP message-id, its `correlation_id` the "
                "AMQP correlation-id); events go to the topic exchange, commands to the direct one. Every work "
                "queue dead-letters to the DLX, which routes to `<queue>.dlq`; transient failures wait in "
                "`<queue>.retry.<delay>ms` delay queues first."
            ),
        },
        "defaultContentType": "application/json",
        "servers": servers,
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": {**_components_schemas(registry), **_headers_schemas(topology)},
            "messages": messages,
            "correlationIds": {
                "sagaId": {
                    "description": "The saga id (= the order id): the envelope's correlation_id, repeated as the AMQP "
                    "correlation-id property.",
                    "location": CORRELATION_ID_LOCATION,
                }
            },
            "securitySchemes": {
                "brokerUser": {
                    "type": "userPassword",
                    "description": "One least-privilege RabbitMQ user per role (`compensa broker grant`).",
                }
            },
        },
    }


def describe(registry: Registry = REGISTRY) -> Mapping[str, str]:
    return {model.message_type: model.kind for model in registry}
