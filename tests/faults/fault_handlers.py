"""Handlers of the fault suite. Each records every execution as a line `<tag> <pid>` in the file
named by the payload's `marker` attribute, so a test sees what ran, where, and how often."""
from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

from xml_pipeline.message_bus.message import Call, Message


def _attr(message: Message, name: str, default: str = "") -> str:
    el = message.element()
    return el.get(name, default) if el is not None else default


def _record(message: Message) -> str:
    tag = _attr(message, "tag")
    marker = _attr(message, "marker")
    if marker:
        with open(marker, "a") as f:
            f.write(f"{tag} {os.getpid()}\n")
    return tag


def work(message: Message) -> str:
    """Record the execution, then burn `seconds` of CPU (cpu_bound tasks)."""
    tag = _record(message)
    end = time.monotonic() + float(_attr(message, "seconds", "0"))
    while time.monotonic() < end:
        sum(i * i for i in range(1000))
    return f'<done tag="{tag}" pid="{os.getpid()}"/>'


def die_once(message: Message) -> str:
    """Kill its worker process the first time a tag runs (like the OOM killer); answer after that."""
    tag = _record(message)
    first = Path(_attr(message, "marker") + f".{tag}.died")
    if not first.exists():
        first.write_text("x")
        os._exit(17)
    return f'<done tag="{tag}" pid="{os.getpid()}"/>'


async def wait(message: Message) -> str:
    """A plain listener that waits on I/O for `seconds`."""
    tag = _record(message)
    await asyncio.sleep(float(_attr(message, "seconds", "0")))
    return f'<done tag="{tag}"/>'


def quit_(message: Message) -> str:
    _record(message)
    sys.exit(3)


def silent(message: Message) -> None:
    _record(message)
    return None


def ping(message: Message) -> Call:
    """Calls pong for every message, including pong's answers: a loop whose chain stays short."""
    return Call("pong", "<ping/>")


def pong(message: Message) -> str:
    return "<pong/>"


def fan(message: Message) -> list[Call]:
    """Calls leaf twice for every message, including leaf's answers: the loop doubles each round."""
    return [Call("leaf", "<x/>"), Call("leaf", "<y/>")]


def leaf(message: Message) -> str:
    return "<leaf/>"
