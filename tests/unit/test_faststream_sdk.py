"""The FastStream integration stays off compensa's hot path and refuses what is not a compensa event."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from faststream.rabbit import RabbitBroker

from producers.sdk.faststream import events_router, subscribe

ROOT = Path(__file__).resolve().parents[2]


def test_compensas_own_services_do_not_import_faststream() -> None:
    code = (
        "import sys\n"
        "import contracts, outbox.uow, sagas, consumers, producers.sdk, producers.ingest\n"
        "import infra.bootstrap, infra.pipeline, infra.runtime, infra.api, infra.cli.main\n"
        "print(sorted(m for m in sys.modules if m == 'faststream' or m.startswith('faststream.')))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "[]"


@pytest.mark.parametrize(
    ("types", "refusal"),
    [
        ((), "at least one event type"),
        (("order.shipped",), "not compensa events: order.shipped"),
        (("order.completed", "stock.reserve"), "not compensa events: stock.reserve"),
    ],
)
def test_subscribe_takes_only_compensa_event_types(types: tuple[str, ...], refusal: str) -> None:
    with pytest.raises(ValueError, match=refusal):
        subscribe(events_router(), "shipping.events", *types)


def test_subscribe_declares_the_queue_its_bindings_and_its_dead_letter_queue() -> None:
    broker = RabbitBroker("amqp://guest:guest@127.0.0.1:1/")
    router = events_router()
    subscriber = subscribe(router, "shipping.events", "order.completed", "order.cancelled")
    broker.include_router(router)

    queues = [(s.queue.name, s.queue.routing_key, s.exchange.name) for s in broker.subscribers]
    assert sorted(queues) == [
        ("shipping.events", "order.cancelled", "compensa.events"),
        ("shipping.events", "order.completed", "compensa.events"),
        ("shipping.events.dlq", "", ""),
    ]
    arguments = subscriber.queue.arguments or {}
    assert arguments["x-dead-letter-exchange"] == "" and arguments["x-dead-letter-routing-key"] == "shipping.events.dlq"
    assert subscriber.queue.durable
