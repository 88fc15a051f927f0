"""Fixtures of the pump tests (plain helpers live in pump_harness.py)."""
from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # xp_test_handlers, for this process and its spawned children

from pump_harness import cli_environment, kill_all  # noqa: E402


@pytest.fixture
def prefix() -> str:
    """A fresh tenant prefix per test (tests share the session's redis-server)."""
    return f"xpt:{uuid.uuid4().hex[:10]}:"


@pytest.fixture
def cli_env() -> dict[str, str]:
    """Environment for `python -m xml_pipeline.cli` subprocesses: test handlers importable, no stray XP_*."""
    return cli_environment(HERE)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Long-running processes started by a test; killed at teardown if still alive."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    kill_all(started)
