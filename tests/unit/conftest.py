"""Fixtures for the CLI's tests over SQLite (test_cli_ops.py, test_cli_core.py).

- ``env``: COMPENSA_DATABASE_URL on a fresh SQLite file, nothing else configured.
- ``migrated``: ``env`` with ``compensa db upgrade`` run.
- ``narrow``: an 80-column terminal for both consoles.
- ``spans``: the finished spans of this process's tracer provider (clear it first).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from infra.settings import get_settings
from tests.unit.support import cli


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[dict[str, str]]:
    """COMPENSA_DATABASE_URL on a fresh SQLite file, no broker or redis; settings re-read."""
    import os

    for key in list(os.environ):
        if key.startswith("COMPENSA_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("COMPENSA_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'c.db'}")
    monkeypatch.setenv("COMPENSA_LOG_LEVEL", "WARNING")
    get_settings.cache_clear()
    yield {}
    get_settings.cache_clear()


@pytest.fixture
def migrated(env: dict[str, str]) -> None:
    result = cli("db", "upgrade")
    assert result.exit_code == 0, result.stderr


@pytest.fixture
def narrow(monkeypatch: pytest.MonkeyPatch) -> int:
    """An 80-column terminal for both consoles (COLUMNS is read once when a console is built)."""
    import infra.cli.common

    monkeypatch.setenv("COLUMNS", "80")
    for console in (infra.cli.common.console, infra.cli.common.unwrapped):
        monkeypatch.setattr(console, "_width", 80)
    return 80


@pytest.fixture(scope="session")
def spans() -> Iterator[InMemorySpanExporter]:
    """Every span this process finishes, from one SDK provider (OpenTelemetry allows one per process)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()
