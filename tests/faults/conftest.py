"""Fixtures of the fault suite: real redis-server, real pump / worker / run processes."""
from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).parent
for p in (HERE, HERE.parent / "pump"):  # fault_handlers for spawned workers; pump_harness
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from pump_harness import cli_environment, kill_all  # noqa: E402


@pytest.fixture
def prefix() -> str:
    return f"xpf:{uuid.uuid4().hex[:10]}:"


@pytest.fixture
def cli_env() -> dict[str, str]:
    return cli_environment(HERE)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    kill_all(started)
