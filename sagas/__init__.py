"""Sagas: definitions as data, the pure transition engine, and the order saga."""

from sagas.definition import Compensation, SagaData, SagaDefinition, Step
from sagas.engine import cancel, on_deadline, on_message, retry_compensation, start
from sagas.order_saga import ORDER_SAGA
from sagas.state import TERMINAL, Deadline, DeadlineKind, SagaState, SagaStatus, Transition

__all__ = [
    "ORDER_SAGA",
    "TERMINAL",
    "Compensation",
    "Deadline",
    "DeadlineKind",
    "SagaData",
    "SagaDefinition",
    "SagaState",
    "SagaStatus",
    "Step",
    "Transition",
    "cancel",
    "on_deadline",
    "on_message",
    "retry_compensation",
    "start",
]
