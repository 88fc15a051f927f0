"""Fixtures of the fault suite: real redis-server, real pump / worker / run processes."""
from __future__ import annotations

import os
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

from pump_harness import REPO, SIGNING_KEY  # noqa: E402


@pytest.fixture
def prefix() -> str:
    return f"xpf:{uuid.uuid4().hex[:10]}:"


@pytest.fixture
def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XP_")}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(REPO / "library"), env.get("PYTHONPATH", "")])
    env["XP_SIGNING_KEY"] = SIGNING_KEY
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait(10)
