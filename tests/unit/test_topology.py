"""Where a message goes back to: its own queue, or the queue its type moved to."""

from infra import topology as t
from infra.dlq.replay import destination


def test_a_dead_letter_goes_back_to_the_queue_it_failed_on() -> None:
    assert destination(t.STOCK_COMMANDS.name, "stock.reserve") == t.STOCK_COMMANDS.name
    assert destination(t.SAGA_EVENTS.name, "stock.reserved") == t.SAGA_EVENTS.name


def test_an_order_created_dead_lettered_before_saga_starts_existed_goes_to_saga_starts() -> None:
    assert (t.SAGA_EVENTS, "order.created") in t.RETIRED_BINDINGS
    assert destination(t.SAGA_EVENTS.name, "order.created") == t.SAGA_STARTS.name


def test_a_type_no_queue_of_its_service_consumes_has_no_destination() -> None:
    assert destination(t.STOCK_COMMANDS.name, "payment.charge") is None
    assert destination("no.such.queue", "stock.reserve") is None
