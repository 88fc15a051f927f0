"""Faults inside one pump: a full thread, Redis at maxmemory, a Redis restart mid-run, loops, a
handler that calls sys.exit or answers nothing. Every conversation ends in exactly one answer or
one error response to its sender (docs/reliability.md)."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from fault_harness import Tally, executions, load, messages, redis_backend, wait_for, write_organism
from pump_harness import REPO

from xml_pipeline.memory import create_backend
from xml_pipeline.message_bus.message import Message, parse_message
from xml_pipeline.message_bus.stream_pump import StreamPump, run_messages

pytestmark = pytest.mark.faults

PLAIN = """
- {name: wait, handler: "fault_handlers:wait"}
"""


async def _run_in_pump(org_path: Path, sent: list[Message], *, max_slots: int | None = None,
                       window: int = 256) -> tuple[Tally, StreamPump]:
    org = load(org_path)
    backend = create_backend(org.backend)
    tally = Tally(sent)
    pump = StreamPump(org, backend, on_output=tally.add, keep_outputs=False)
    if max_slots is not None:
        pump.buffer.max_slots_per_thread = max_slots
    await pump.start()
    try:
        await asyncio.wait_for(run_messages(pump, sent, window=window), 60)
    finally:
        await pump.stop(timeout=10)
        backend.close()
    return tally, pump


async def test_a_full_thread_answers_with_an_error(redis_server, prefix: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Every message from one sender to one listener shares one thread; once it is full, each
    further message gets a ThreadFull error naming the cap (not a traceback and silence)."""
    marker = tmp_path / "runs"
    path = write_organism(tmp_path, PLAIN, backend=redis_backend(redis_server.url, prefix))
    sent = messages("wait", 25, marker)
    tally, pump = await _run_in_pump(path, sent, max_slots=10)
    tally.assert_exactly_one_each()
    assert tally.answered == 10 and tally.errored == 15
    errors = [m for m in tally.outputs if m.is_error]
    assert all('type="ThreadFull"' in m.payload and "max_slots_per_thread" in m.payload and m.to == "console"
               for m in errors)
    assert sum(executions(marker).values()) == 10 and max(executions(marker).values()) == 1
    assert pump.stats.failed_conversations == 15


async def test_redis_at_maxmemory_answers_every_message(redis_factory, prefix: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = redis_factory(extra_args=("--maxmemory", "3mb", "--maxmemory-policy", "noeviction")).start()
    marker = tmp_path / "runs"
    path = write_organism(tmp_path, PLAIN, backend=redis_backend(server.url, prefix))
    big = "x" * 10_000
    sent = [Message(sender=f"s{i}", to="wait", payload=f'<m tag="t{i}" marker="{marker}" pad="{big}"/>')
            for i in range(400)]
    tally, _pump = await _run_in_pump(path, sent, window=16)
    tally.assert_exactly_one_each()
    assert tally.errored > 0 and tally.answered > 0  # the server filled up part way
    assert max(executions(marker).values()) == 1
    assert all(m.to.startswith("s") for m in tally.outputs)


def _run_cli(path: Path, sent: list[Message], env: dict[str, str], *extra: str) -> subprocess.Popen[str]:
    doc = "<messages>" + "".join(m.to_xml() for m in sent) + "</messages>"
    p = subprocess.Popen([sys.executable, "-m", "xml_pipeline.cli", "run", str(path), "--input", "-",
                          "--no-progress", *extra], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert p.stdin is not None
    p.stdin.write(doc)
    p.stdin.close()
    return p


def _collect(p: subprocess.Popen[str], tally: Tally) -> threading.Thread:
    def read() -> None:
        assert p.stdout is not None
        for line in p.stdout:
            if line.startswith("<message"):
                tally.add(parse_message(line))

    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t


def test_a_redis_restart_mid_run_answers_every_message(fresh_redis, prefix: str, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                       cli_env: dict[str, str]) -> None:
    marker = tmp_path / "runs"
    path = write_organism(tmp_path, PLAIN, backend=redis_backend(fresh_redis.url, prefix))
    sent = messages("wait", 1500, marker, seconds="0.05")
    tally = Tally(sent)
    p = _run_cli(path, sent, cli_env)
    reader = _collect(p, tally)
    wait_for(lambda: len(tally.outputs) >= 100, "the first answers", 60)
    fresh_redis.restart()  # no persistence: every key is gone
    assert p.wait(120) in (0, 1)
    reader.join(10)
    stderr = p.stderr.read() if p.stderr else ""
    tally.assert_exactly_one_each()
    assert p.returncode == (1 if tally.errored else 0), stderr
    assert "Traceback" not in stderr
    assert max(executions(marker).values()) == 1


LOOPS = """
- {name: ping, handler: "fault_handlers:ping"}
- {name: pong, handler: "fault_handlers:pong"}
- {name: fan, handler: "fault_handlers:fan"}
- {name: leaf, handler: "fault_handlers:leaf"}
- {name: quit, handler: "fault_handlers:quit_"}
- {name: silent, handler: "fault_handlers:silent"}
- {name: wait, handler: "fault_handlers:wait"}
"""


def test_loops_sys_exit_and_silence_end_in_one_error_each(tmp_path: Path, cli_env: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    marker = tmp_path / "runs"
    path = write_organism(tmp_path, LOOPS, backend={"type": "memory"})
    sent = [Message(sender="console", to=to, payload=f'<m tag="{to}" marker="{marker}"/>')
            for to in ("ping", "fan", "quit", "silent", "wait")]
    tally = Tally(sent)
    p = _run_cli(path, sent, cli_env)
    reader = _collect(p, tally)
    assert p.wait(120) == 1  # conversations ended in errors: the run says so
    reader.join(10)
    stderr = p.stderr.read() if p.stderr else ""
    tally.assert_exactly_one_each()
    by_to = {m.id: m.to for m in sent}
    got = {by_to[m.in_reply_to or ""]: m for m in tally.outputs}
    assert 'type="LoopLimit"' in got["ping"].payload and 'type="LoopLimit"' in got["fan"].payload
    assert 'type="HandlerError"' in got["quit"].payload and "SystemExit" in got["quit"].payload
    assert 'type="NoResponse"' in got["silent"].payload
    assert not got["wait"].is_error
    assert "4 of 5 conversation(s) ended in an error response" in stderr and "Traceback" not in stderr
    # The loops were cut off at the bound, not left to fill the buffer.
    info = json.loads(stderr.split("backend info: ", 1)[1].splitlines()[0])
    assert info["total_slots"] < 5_000
