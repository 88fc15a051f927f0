"""Handlers for the pump tests. Importable by worker processes (tests/pump is on their PYTHONPATH)."""
from __future__ import annotations

import os
import time
from pathlib import Path

from xml_pipeline.message_bus.message import Call, Message


def _attr(message: Message, name: str, default: str = "") -> str:
    el = message.element()
    return el.get(name, default) if el is not None else default


def _mark(message: Message) -> None:
    """Append '<pid>' to the file named by the payload's marker attribute (how tests see who ran what)."""
    marker = _attr(message, "marker")
    if marker:
        with open(marker, "a") as f:
            f.write(f"{os.getpid()}\n")


def echo(message: Message) -> str:
    """Reply with the pid of the process that ran the handler and the payload's size."""
    _mark(message)
    return f'<echo pid="{os.getpid()}" size="{len(message.payload)}" tag="{_attr(message, "tag")}"/>'


def mirror(message: Message) -> str:
    """Reply with the payload itself (a response as large as the request)."""
    _mark(message)
    return message.payload


async def async_echo(message: Message) -> str:
    return f'<echo pid="{os.getpid()}" async="yes"/>'


def fail(message: Message) -> str:
    _mark(message)
    raise RuntimeError("boom: this handler always fails")


def die(message: Message) -> str:
    """Kill the process running the handler, like a segfault or the OOM killer would."""
    _mark(message)
    os._exit(17)


def die_when(message: Message) -> str:
    """Wait until the file named by the payload's `go` attribute exists, then die like `die`."""
    _mark(message)
    go = Path(_attr(message, "go"))
    deadline = time.monotonic() + 60
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    os._exit(17)


def slow(message: Message) -> str:
    """Burn CPU for `seconds` (a long task), after writing the marker."""
    _mark(message)
    seconds = float(_attr(message, "seconds", "1"))
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += sum(i * i for i in range(1000))
    return f'<slow pid="{os.getpid()}" tag="{_attr(message, "tag")}"/>'


def relay(message: Message) -> str | Call:
    """A plain listener that calls `echo` (cpu_bound) and passes its answer on to its caller."""
    if message.kind == "request" and message.sender not in ("echo",):
        return Call("echo", message.payload)
    return f"<relayed>{message.payload}</relayed>"


def touch_file(message: Message) -> str:
    Path(_attr(message, "path")).write_text("x")
    return "<ok/>"
