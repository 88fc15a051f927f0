"""Fixtures of the test areas that run the CLI as real processes (tests/pump, tests/faults): each
area's conftest.py imports them, so both get the same fixtures from one place."""
from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator

import pytest
from pump_harness import cli_environment, kill_all


@pytest.fixture
def prefix() -> str:
    """A fresh tenant prefix per test (tests share the session's redis-server)."""
    return f"xpt:{uuid.uuid4().hex[:10]}:"


@pytest.fixture
def cli_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """Environment for `python -m xml_pipeline.cli` subprocesses: the handler modules beside the
    test module importable, no stray XP_*."""
    return cli_environment(request.path.parent)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Long-running processes started by a test; killed at teardown if still alive."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    kill_all(started)
