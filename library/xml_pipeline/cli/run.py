"""`xml-pipeline run ORGANISM.yaml`: the whole organism on this machine.

Exit codes: 0 every conversation ended in an answer; 1 a conversation ended in an error response
(the built-in --demo set has one on purpose and exits 0), or the run timed out; 2 a usage mistake.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from typing import Any, TextIO

from ..memory.factory import create_backend
from ..memory.protocol import SharedBackend
from ..message_bus.local_pool import Dispatcher, default_dispatcher
from ..message_bus.message import Message, split_messages
from ..message_bus.stream_pump import StreamPump, run_messages
from ..organism import Organism, load_organism
from . import EXIT_FAILURE, EXIT_OK, UsageError

#: The built-in demo set (for examples/demo/organism.yaml: greeter + cpu_bound primes).
DEMO_MESSAGES: tuple[tuple[str, str], ...] = (
    ("greeter", '<greet name="Ada"/>'),
    ("greeter", '<greet name="Grace" lucky="100000"/>'),
    ("primes", '<count below="250000"/>'),
    ("primes", '<count below="300000"/>'),
    ("primes", '<count below="350000"/>'),
    ("primes", '<count below="400000"/>'),
    ("primes", '<count below="many"/>'),
    ("greeter", '<greet name="Linus"/>'),
)


class ProgressBar:
    """A one-line progress bar on a terminal (nothing at all when the stream is not a TTY)."""

    def __init__(self, total: int, stream: TextIO = sys.stderr, *, enabled: bool = True, width: int = 30) -> None:
        self.total = total
        self.stream = stream
        self.enabled = enabled and total > 1 and stream.isatty()
        self.width = width
        self.done = 0
        self._start = time.monotonic()
        self._last = 0.0
        self._shown = False

    def update(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        # Only for long runs, and at most 10 redraws a second.
        if not self.enabled or now - self._start < 0.5 or (now - self._last < 0.1 and done < self.total):
            return
        self._last = now
        filled = int(self.width * done / max(1, self.total))
        rate = done / max(1e-9, now - self._start)
        self.stream.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} "
                          f"({rate:.1f}/s)\033[K")
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        if self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def redraw(self) -> None:
        if self._shown:
            self._last = 0.0
            self.update(self.done)


def _read_messages(args: argparse.Namespace) -> list[Message]:
    if args.demo:
        return [Message(sender="console", to=to, payload=payload) for to, payload in DEMO_MESSAGES]
    source = args.input
    if source is None:
        if sys.stdin.isatty():
            raise UsageError("no messages: give --input FILE, --input - (stdin) or --demo")
        source = "-"
    if source == "-":
        data = sys.stdin.buffer.read()
        where = "stdin"
    else:
        try:
            with open(source, "rb") as f:
                data = f.read()
        except OSError as e:
            raise UsageError(f"--input: cannot read {source!r}: {e.strerror or e}") from None
        where = source
    from ..message_bus.message import MessageError
    try:
        messages = split_messages(data)
    except MessageError as e:
        raise MessageError(f"{where}: {e}") from None
    # Checked before anything runs: the pump refuses an id already in flight, which would end the
    # run half way with the rest of the input never fed.
    first: dict[str, int] = {}
    for n, m in enumerate(messages, 1):
        if m.id in first:
            raise MessageError(f"{where}: message {n} repeats the id {m.id!r} of message {first[m.id]} "
                               "(allowed: a distinct id per message, or no id attribute for a fresh one)")
        first[m.id] = n
    return messages


def _pool_overrides(organism: Organism, args: argparse.Namespace) -> Organism:
    changes: dict[str, Any] = {}
    if args.workers is not None:
        if args.workers < 1:
            raise UsageError(f"--workers must be >= 1, got {args.workers}")
        changes["workers"] = args.workers
    if args.start_method:
        changes["start_method"] = args.start_method
    if not changes:
        return organism
    return dataclasses.replace(organism, process_pool=dataclasses.replace(organism.process_pool, **changes))


def make_dispatcher(organism: Organism, backend: SharedBackend) -> Dispatcher | None:
    return default_dispatcher(organism, backend) if organism.has_cpu_bound else None


def _format(m: Message, fmt: str) -> str:
    if fmt == "xml":
        return m.to_xml()
    flag = "  ERROR" if m.is_error else ""
    return f"{m.sender} → {m.to}{flag}  {m.payload}"


def cmd_run(args: argparse.Namespace) -> int:
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError(f"--timeout must be > 0, got {args.timeout}")
    organism = _pool_overrides(load_organism(args.organism), args)
    messages = _read_messages(args)
    fmt = args.format or ("text" if args.demo else "xml")
    backend = create_backend(organism.backend)
    try:
        return asyncio.run(_run(organism, backend, messages, fmt, args))
    finally:
        backend.close()


async def _run(organism: Organism, backend: SharedBackend, messages: list[Message], fmt: str,
               args: argparse.Namespace) -> int:
    out = sys.stdout
    bar = ProgressBar(len(messages), enabled=not args.no_progress and not args.quiet)
    responses = errors = 0
    errored: set[str] = set()  # conversations with an error response

    def on_output(m: Message) -> None:
        nonlocal responses, errors
        responses += 1
        errors += m.is_error
        if m.is_error and m.in_reply_to:
            errored.add(m.in_reply_to)
        bar.clear()
        print(_format(m, fmt), file=out, flush=True)
        bar.redraw()

    dispatcher = make_dispatcher(organism, backend)
    if fmt == "text":
        where = dispatcher.describe() if dispatcher is not None else "no worker processes (no cpu_bound listener)"
        print(f"organism {organism.name} · backend {organism.backend.backend_type} · {where}", file=out)
        for ls in organism.listeners:
            kind = "cpu_bound" if ls.cpu_bound else "plain"
            print(f"  {ls.name:<14} {kind:<10} {ls.description}", file=out)
        print(f"feeding {len(messages)} message(s) …", file=out, flush=True)
    pump = StreamPump(organism, backend, dispatcher=dispatcher, on_output=on_output, keep_outputs=False)
    await pump.start()
    timed_out = False
    try:
        try:
            elapsed = await asyncio.wait_for(run_messages(pump, messages, on_progress=lambda d, t: bar.update(d)),
                                             args.timeout)
        except asyncio.TimeoutError:
            timed_out = True
            elapsed = float(args.timeout)
    finally:
        bar.clear()
        await pump.stop(drain=not timed_out, timeout=5)
    info = backend.info()
    summary = (f"{len(messages)} conversation(s), {responses} response(s)"
               f"{f' ({errors} error)' if errors == 1 else f' ({errors} errors)' if errors else ''} in {elapsed:.1f} s")
    info_line = "backend info: " + json.dumps(info, default=str, sort_keys=True)
    if fmt == "text":
        print(summary, file=out)
        print(info_line, file=out, flush=True)
    elif not args.quiet:
        print(summary, file=sys.stderr)
        print(info_line, file=sys.stderr, flush=True)
    if timed_out:
        print(f"xml-pipeline run: timed out after {args.timeout:g} s with {pump.inflight} conversation(s) "
              "unfinished", file=sys.stderr)
        return EXIT_FAILURE
    if errored and not args.demo:
        print(f"xml-pipeline run: {len(errored)} of {len(messages)} conversation(s) ended in an error "
              "response", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


__all__ = ["cmd_run", "DEMO_MESSAGES", "ProgressBar", "make_dispatcher"]
