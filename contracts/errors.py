"""The error tree every layer shares: permanent, transient and conflict."""

from __future__ import annotations


class CompensaError(Exception):
    """Base of every error compensa raises on purpose."""

    #: Short class name written into dead-letter headers.
    reason_class = "error"


class ContractError(CompensaError):
    """A message that can never be processed: bad body, unknown type, invalid payload."""

    reason_class = "contract"


class BusinessRuleError(CompensaError):
    """A well-formed message that a participant's rules refuse; retrying cannot help."""

    reason_class = "business_rule"


class TransientError(CompensaError):
    """A failure that may pass: connection loss, timeout, lock conflict. Retry it."""

    reason_class = "transient"


class Deferred(TransientError):
    """Refused before any work began (a circuit breaker is open): try again after `retry_after_seconds`.

    The consumer retries it through the delay queues without using an attempt, for as
    long as its outage budget allows (then it counts attempts like any transient failure).
    """

    reason_class = "deferred"

    def __init__(self, message: str, retry_after_seconds: float) -> None:
        super().__init__(message)
        self.retry_after_seconds = max(0.0, retry_after_seconds)


class ConflictError(TransientError):
    """An optimistic-lock conflict: someone else changed the row first. Retry it."""

    reason_class = "conflict"
