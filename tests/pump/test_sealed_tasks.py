"""Worker pods get the message in the task entry and answer in the result entry, both sealed for the
task (task_seal.py): no temp keys, and nothing anyone else wrote to the streams runs or is routed.
Real `xml-pipeline worker` processes and a real redis-server."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from pump_harness import organism_yaml
from test_distributed import ask, eventually, lines, load, start_worker

from xml_pipeline.memory import create_backend
from xml_pipeline.memory.signing import Signer
from xml_pipeline.message_bus.dispatcher import RedisDispatcher
from xml_pipeline.message_bus.message import Message
from xml_pipeline.message_bus.stream_pump import StreamPump
from xml_pipeline.message_bus.streams import Streams, dead_letters
from xml_pipeline.message_bus.task_seal import INLINE_PAYLOAD_MAX, namespace_of, seal_input, seal_response
from xml_pipeline.message_bus.worker_task import (
    INTEGRITY_ERROR,
    MISSING_DATA,
    WorkerResult,
    WorkerTask,
)

LISTENERS = """
- {name: mirror, handler: "xp_test_handlers:mirror", cpu_bound: true}
"""


def _organism(tmp_path: Path, redis_url: str, prefix: str) -> Path:
    path = tmp_path / "organism.yaml"
    path.write_text(organism_yaml(name="sealed", backend={"type": "redis", "redis_url": redis_url,
                                                          "redis_prefix": prefix, "redis_ttl": 300},
                                  listeners=LISTENERS, pool={"workers": 1, "max_attempts": 2}))
    return path


def _setup(tmp_path: Path, server: Any, prefix: str) -> tuple[Path, Any, Any, Any]:
    """(organism.yaml, the organism, its backend, a raw client of the server)."""
    path = _organism(tmp_path, server.url, prefix)
    org = load(path)
    return path, org, create_backend(org.backend), server.client()


def _mgets(client: Any) -> int:
    return int(client.info("commandstats").get("cmdstat_mget", {}).get("calls", 0))


async def test_the_task_entry_carries_the_sealed_message_and_no_temp_key_is_made(
        redis_server, prefix: str, tmp_path: Path, cli_env: dict[str, str], procs: list[Any]) -> None:  # type: ignore[no-untyped-def]
    path, org, backend, client = _setup(tmp_path, redis_server, prefix)
    dispatcher = RedisDispatcher(backend)
    mgets_before = _mgets(client)
    big = "<big>" + "y" * (INLINE_PAYLOAD_MAX * 16) + "</big>"  # ~1 MB
    async with StreamPump(org, backend, dispatcher=dispatcher) as pump:
        small_job = asyncio.create_task(pump.request(ask("mirror", "<small/>"), timeout=60))
        big_job = asyncio.create_task(pump.request(ask("mirror", big), timeout=60))
        tasks = Streams(backend).tasks
        entries = await eventually(lambda: (e := client.xrange(tasks)) and len(e) == 2 and e, "both tasks queued")
        start_worker(path, cli_env, tmp_path, "w", procs)  # only now: the entries were seen whole
        (small,), (large,) = await asyncio.gather(small_job, big_job)
    by_size = sorted((f for _, f in entries), key=lambda f: len(f[b"input"]))
    small_fields, big_fields = by_size
    assert b"<small/>" in small_fields[b"input"]  # the message itself, in the entry
    assert len(big_fields[b"input"]) < 1000  # a large payload stays in its slot: a reference
    assert all(f[b"payload_key"] == f[b"metadata_key"] == b"" for f in by_size)
    # Every field is text (a reader that decodes each field, e.g. a worker of an earlier release).
    for f in by_size:
        for v in f.values():
            v.decode("utf-8")
    assert small.kind == "response" and small.payload == "<small/>"
    assert large.kind == "response" and large.payload == big  # a 1 MB response in the result entry
    assert list(client.scan_iter(match=f"{prefix}tmp:*")) == []
    # A worker reads temp-key inputs with MGET: none was sent (the server is shared with other tests).
    assert _mgets(client) == mgets_before
    backend.close()


async def test_a_forged_or_moved_task_entry_runs_nothing(
        redis_server, prefix: str, tmp_path: Path, cli_env: dict[str, str], procs: list[Any]) -> None:  # type: ignore[no-untyped-def]
    path, org, backend, client = _setup(tmp_path, redis_server, prefix)
    s = Streams(backend)
    s.ensure_task_groups()
    marker = tmp_path / "ran"
    msg = Message("console", "mirror", f'<x marker="{marker}"/>', thread="t1")
    reply_to = s.results("nobody")
    ns = namespace_of(backend)
    forged = seal_input(Signer.random(), ns, "forged", "mirror", "xp_test_handlers:mirror", msg)
    genuine = seal_input(backend.signer, ns, "genuine", "mirror", "xp_test_handlers:mirror", msg)
    for task in (WorkerTask("forged", "mirror", "xp_test_handlers:mirror", "", "", reply_to=reply_to, sealed_input=forged),
                 # A genuine input under another task id: bound to its own.
                 WorkerTask("moved", "mirror", "xp_test_handlers:mirror", "", "", reply_to=reply_to, sealed_input=genuine)):
        client.xadd(s.tasks, task.to_fields())  # type: ignore[arg-type]
    start_worker(path, cli_env, tmp_path, "w", procs)
    results = await eventually(lambda: (r := client.xrange(reply_to)) and len(r) == 2 and r, "both refusals")
    got = {WorkerResult.from_fields(f).task_id: WorkerResult.from_fields(f) for _, f in results}
    assert set(got) == {"forged", "moved"}
    assert all(r.error_type == "DeadLetter" and "SlotIntegrityError" in (r.error or "") for r in got.values())
    assert not marker.exists() and lines(marker) == []  # the handler never ran
    dead = dead_letters(backend)
    assert len(dead) == 2 and all(d["error_type"] == INTEGRITY_ERROR and d["input"].startswith("<signed input, ")
                                  for d in dead)
    backend.close()


async def test_a_forged_or_moved_response_is_an_integrity_error(redis_server, prefix: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, _, backend, client = _setup(tmp_path, redis_server, prefix)
    dispatcher = RedisDispatcher(backend)
    await dispatcher.start()
    ns = namespace_of(backend)
    try:
        msg = Message("console", "mirror", "<m/>", thread="t1")
        runs = [asyncio.ensure_future(dispatcher.run(WorkerTask(f"t{i}", "mirror", "xp_test_handlers:mirror", "", "",
                                                                message=msg))) for i in range(4)]
        await eventually(lambda: client.xlen(dispatcher.streams.tasks) == 4, "the tasks queued")
        answers = {
            "t0": seal_response(backend.signer, ns, "t0", b'[{"op":"reply","payload":"<ok/>"}]'),  # genuine
            "t1": seal_response(Signer.random(), ns, "t1", b'[{"op":"reply","payload":"<x/>"}]'),  # forged
            "t2": seal_response(backend.signer, ns, "t0", b'[{"op":"reply","payload":"<x/>"}]'),  # t0's, moved
            "t3": b"",  # none at all
        }
        for task_id, sealed in answers.items():
            client.xadd(dispatcher.results_key, WorkerResult(task_id, worker="w", sealed_response=sealed).to_fields())  # type: ignore[arg-type]
        ok, forged, moved, missing = await asyncio.wait_for(asyncio.gather(*runs), 30)
    finally:
        await dispatcher.close()
    assert ok.ok and ok.response == b'[{"op":"reply","payload":"<ok/>"}]'
    assert forged.error_type == moved.error_type == INTEGRITY_ERROR
    assert "signature does not match" in (moved.error or "") and "does not know" in (forged.error or "")
    assert missing.error_type == MISSING_DATA
    backend.close()


async def test_an_entry_that_is_not_text_is_dead_lettered_and_both_sides_go_on(
        redis_server, prefix: str, tmp_path: Path, cli_env: dict[str, str], procs: list[Any]) -> None:  # type: ignore[no-untyped-def]
    path, org, backend, client = _setup(tmp_path, redis_server, prefix)
    dispatcher = RedisDispatcher(backend)
    s = Streams(backend)
    s.ensure_task_groups()
    client.xadd(s.tasks, {b"task_id\xff": b"\x9a\x00", b"input": b"\xff" * 40})  # no worker may stop on it
    start_worker(path, cli_env, tmp_path, "w", procs)
    async with StreamPump(org, backend, dispatcher=dispatcher) as pump:
        client.xadd(dispatcher.results_key, {b"\xfe": b"\x9a", b"response": b"\xff"})  # nor the pump's reader
        (out,) = await pump.request(ask("mirror", "<after/>"), timeout=60)
    assert out.kind == "response" and out.payload == "<after/>"
    (dead,) = await eventually(lambda: dead_letters(backend), "the malformed entry dead-lettered")
    assert "malformed task" in dead["error"]
    backend.close()
