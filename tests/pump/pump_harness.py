"""Helpers of the pump tests that test modules import: organism files and the CLI as a real process.

(Not in conftest.py: `from conftest import ...` picks up another area's conftest when several test
areas run in one pytest command, since every conftest.py is imported under the name `conftest`.)"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
REPO = HERE.parent.parent
SIGNING_KEY = "pump-tests-signing-key-0123456789"


def cli_environment(handlers_dir: Path) -> dict[str, str]:
    """Environment for `python -m xml_pipeline.cli` subprocesses: the test handlers in `handlers_dir`
    importable, no stray XP_* from the caller, the tests' signing key, unbuffered output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("XP_")}
    env["PYTHONPATH"] = os.pathsep.join([str(handlers_dir), str(REPO / "library"), env.get("PYTHONPATH", "")])
    env["XP_SIGNING_KEY"] = SIGNING_KEY
    env["PYTHONUNBUFFERED"] = "1"
    return env


def kill_all(started: list[subprocess.Popen[bytes]]) -> None:
    """Kill the processes a test started that are still alive (fixture teardown)."""
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait(10)


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
