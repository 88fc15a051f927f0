"""Fixtures of the pump tests: organism files, subprocess environments, the CLI as a real process."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent
REPO = HERE.parent.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # xp_test_handlers, for this process and its spawned children

SIGNING_KEY = "pump-tests-signing-key-0123456789"


def organism_yaml(*, name: str = "t", backend: dict[str, Any] | None = None, listeners: str,
                  pool: dict[str, Any] | None = None) -> str:
    lines = [f"organism: {{name: {name}}}"]
    if backend:
        lines.append("backend:")
        lines += [f"  {k}: {v!r}" if isinstance(v, str) else f"  {k}: {v}" for k, v in backend.items()]
    if pool:
        lines.append("process_pool:")
        lines += [f"  {k}: {v}" for k, v in pool.items()]
    lines.append("listeners:")
    lines.append(textwrap.indent(textwrap.dedent(listeners).strip("\n"), "  "))
    return "\n".join(lines) + "\n"


@pytest.fixture
def prefix() -> str:
    """A fresh tenant prefix per test (tests share the session's redis-server)."""
    return f"xpt:{uuid.uuid4().hex[:10]}:"


@pytest.fixture
def cli_env() -> dict[str, str]:
    """Environment for `python -m xml_pipeline.cli` subprocesses: test handlers importable, no stray XP_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("XP_")}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(REPO / "library"), env.get("PYTHONPATH", "")])
    env["XP_SIGNING_KEY"] = SIGNING_KEY
    env["PYTHONUNBUFFERED"] = "1"
    return env


def cli(*args: str, env: dict[str, str], input: str | bytes | None = None, timeout: float = 60,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `xml-pipeline ARGS` as a real process and wait for it."""
    if isinstance(input, bytes):
        input = input.decode()
    return subprocess.run([sys.executable, "-m", "xml_pipeline.cli", *args], env=env, input=input,
                          capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO)


def cli_popen(*args: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start a long-running `xml-pipeline ARGS` (pump, worker) with its output in `log`."""
    f = open(log, "wb")
    return subprocess.Popen([sys.executable, "-m", "xml_pipeline.cli", *args], env=env, stdout=f,
                            stderr=subprocess.STDOUT, cwd=REPO)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Long-running processes started by a test; killed at teardown if still alive."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait(10)
