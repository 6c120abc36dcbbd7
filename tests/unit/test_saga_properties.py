"""Property: under any interleaving, duplication or loss of replies and deadlines,
the order saga ends terminal and leaks neither money nor stock."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contracts.messages import (
    Money,
    OrderCreated,
    OrderLine,
    Payload,
    PaymentAuthorized,
    PaymentDeclined,
    PaymentRefunded,
    StockCommitFailed,
    StockCommitted,
    StockReleased,
    StockReservationFailed,
    StockReserved,
)
from sagas import (
    ORDER_SAGA,
    Deadline,
    SagaState,
    SagaStatus,
    Transition,
    on_deadline,
    on_message,
    retry_compensation,
    start,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
OID = "o-prop"
ORDER = OrderCreated(
    order_id=OID,
    customer_id="c",
    lines=(OrderLine(sku="s", quantity=1, unit_price=900),),
    total=Money(amount=900, currency="EUR"),
    payment_token="tok",
)
EUR900 = Money(amount=900, currency="EUR")

# What a participant may answer to each command: (success, failure) or (confirmation,).
ANSWERS: dict[str, tuple[Payload, ...]] = {
    "stock.reserve": (
        StockReserved(order_id=OID, lines=()),
        StockReservationFailed(order_id=OID, reason="none"),
    ),
    "payment.charge": (
        PaymentAuthorized(order_id=OID, payment_id="p", amount=EUR900),
        PaymentDeclined(order_id=OID, reason="no"),
    ),
    "stock.commit": (StockCommitted(order_id=OID), StockCommitFailed(order_id=OID, reason="expired")),
    "stock.release": (StockReleased(order_id=OID),),
    "payment.refund": (PaymentRefunded(order_id=OID, amount=EUR900),),
}
STEP_OF_SUCCESS = {step.success.message_type: step for step in ORDER_SAGA.steps}
STEP_OF_COMMAND = {step.command.message_type: step for step in ORDER_SAGA.steps}
COMPENSATIONS = {"stock.release", "payment.refund"}
OUTCOMES = {
    SagaStatus.COMPLETED: "order.completed",
    SagaStatus.CANCELLED: "order.cancelled",
    SagaStatus.REJECTED: "order.rejected",
}


@dataclass
class World:
    """One saga, its participants' replies in flight, and everything it ever sent."""

    draw: st.DataObject
    transition: Transition
    deadline: Deadline | None
    now: datetime = T0
    inflight: list[Payload] = field(default_factory=list)
    emitted: list[Payload] = field(default_factory=list)
    seen_deadlines: list[Deadline] = field(default_factory=list)
    first_success_at: dict[str, int] = field(default_factory=dict)  # step -> index into emitted
    effects: dict[str, int] = field(default_factory=dict)  # step -> index of its command
    changes: int = 0
    draining: bool = False

    @property
    def state(self) -> SagaState:
        return self.transition.state

    def record(self, transition: Transition) -> None:
        self.now += timedelta(seconds=1)
        if not transition.changed:
            return
        self.transition = transition
        self.changes += 1
        self.deadline = transition.deadline
        assert (transition.deadline is None) == transition.state.is_terminal, transition.note
        if transition.deadline is not None:
            self.seen_deadlines.append(transition.deadline)
        for payload in transition.outgoing:
            self.emitted.append(payload)
            if payload.kind == "command":
                self.answer(payload)

    def answer(self, command: Payload) -> None:
        """Let the participant act and answer; either may be lost."""
        answers = ANSWERS[command.message_type]
        step = STEP_OF_COMMAND.get(command.message_type)
        if step is None and self.draining:
            reply: Payload | None = answers[0]  # from here on, compensations are confirmed
        else:
            reply = self.draw.draw(st.sampled_from([*answers, None]), label=command.message_type)
        if step is not None:
            # No reply: the command was lost, or the step happened and its reply was.
            happened = reply is answers[0] or (reply is None and self.draw.draw(st.booleans()))
            if happened:
                self.effects.setdefault(step.name, len(self.emitted))
        if reply is not None:
            self.inflight.append(reply)

    def deliver(self, index: int, keep: bool) -> None:
        payload = self.inflight[index] if keep else self.inflight.pop(index)
        step = STEP_OF_SUCCESS.get(payload.message_type)
        if step is not None:
            self.first_success_at.setdefault(step.name, len(self.emitted))
        self.record(on_message(ORDER_SAGA, self.state, payload, self.now))

    def fire(self, deadline: Deadline) -> None:
        self.record(on_deadline(ORDER_SAGA, self.state, deadline, self.now))


def chaos(world: World, actions: int) -> None:
    """Deliver replies in any order, duplicate them, fire live and stale deadlines."""
    draw = world.draw.draw
    for _ in range(actions):
        action = draw(st.sampled_from(["deliver", "duplicate", "deadline", "stale"]))
        if action in ("deliver", "duplicate") and world.inflight:
            index = draw(st.integers(0, len(world.inflight) - 1))
            world.deliver(index, keep=action == "duplicate")
        elif action == "stale" and world.seen_deadlines:
            world.fire(draw(st.sampled_from(world.seen_deadlines)))
        elif world.deadline is not None:
            world.fire(world.deadline)


def drain(world: World) -> None:
    """Answer everything outstanding; fire deadlines only when nothing is in flight."""
    world.draining = True
    for _ in range(500):
        if world.inflight:
            world.deliver(0, keep=False)
        elif world.state.status is SagaStatus.COMPENSATION_FAILED:
            world.record(retry_compensation(ORDER_SAGA, world.state, world.now))  # the operator
        elif world.deadline is not None:
            world.fire(world.deadline)
        else:
            return
    raise AssertionError("saga did not settle")


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), actions=st.integers(0, 40))
def test_any_interleaving_ends_terminal_without_leaks(data: st.DataObject, actions: int) -> None:
    first = start(ORDER_SAGA, ORDER, OID, T0)
    world = World(draw=data, transition=first, deadline=None)
    world.record(first)

    chaos(world, actions)
    drain(world)

    state = world.state
    emitted_types = [p.message_type for p in world.emitted]
    assert state.status in OUTCOMES, state
    assert state.version == world.changes
    # Exactly one outcome, matching the status; after it only late compensations.
    outcomes = [t for t in emitted_types if t.startswith("order.")]
    assert outcomes == [OUTCOMES[state.status]]
    after_outcome = emitted_types[emitted_types.index(outcomes[0]) + 1 :]
    assert set(after_outcome) <= COMPENSATIONS

    if state.status is SagaStatus.COMPLETED:
        # A completed saga never refunds or releases.
        assert not COMPENSATIONS & set(emitted_types)
        return
    # No leak: a step seen to succeed is undone after its success was seen, and a step
    # that happened unseen (its reply lost or late) is undone after its command was sent.
    for step_name, since in [*world.first_success_at.items(), *world.effects.items()]:
        undo = compensation_of(step_name)
        assert undo in emitted_types[since:], (step_name, emitted_types)


def compensation_of(step_name: str) -> str:
    step = next(s for s in ORDER_SAGA.steps if s.name == step_name)
    assert step.compensation is not None
    return step.compensation.command_type
