"""Simulation tests: the real handlers on SQLite, the in-memory broker, a virtual clock.

No test here starts a server, except those marked ``integration`` (test_realstack).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog

from infra.logging import configure_logging


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[None]:
    """Injected faults log as errors by design; keep them out of the test output."""
    saved = structlog.get_config()
    configure_logging("CRITICAL", "json")
    yield
    structlog.configure(**saved)
