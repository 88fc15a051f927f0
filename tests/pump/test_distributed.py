"""Distributed mode with real `xml-pipeline worker` / `pump` processes and a real redis-server."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from pump_harness import SIGNING_KEY, cli, cli_popen, organism_yaml

from xml_pipeline.memory import create_backend
from xml_pipeline.memory.async_store import RedisStore
from xml_pipeline.message_bus.dispatcher import RedisDispatcher
from xml_pipeline.message_bus.streams import WORKER_GROUP, Streams, dead_letters
from xml_pipeline.message_bus.message import Message
from xml_pipeline.message_bus.stream_pump import StreamPump
from xml_pipeline.message_bus.worker_task import WorkerResult
from xml_pipeline.organism import Organism, load_organism

LISTENERS = """
- {name: greeter, handler: "xml_pipeline.examples.greeter:handle"}
- {name: primes, handler: "xml_pipeline.examples.cpu:count_primes", cpu_bound: true}
- {name: slow, handler: "xp_test_handlers:slow", cpu_bound: true}
- {name: fail, handler: "xp_test_handlers:fail", cpu_bound: true}
- {name: die, handler: "xp_test_handlers:die", cpu_bound: true}
- {name: echo, handler: "xp_test_handlers:echo", cpu_bound: true}
"""


def write_organism(tmp_path: Path, redis_url: str, prefix: str, **pool: Any) -> Path:
    settings = {"workers": 1, "claim_idle_seconds": 1.0, "heartbeat_seconds": 0.2, "max_attempts": 2,
                "drain_seconds": 20}
    settings.update(pool)
    path = tmp_path / "organism.yaml"
    path.write_text(organism_yaml(name="dist", backend={"type": "redis", "redis_url": redis_url,
                                                        "redis_prefix": prefix, "redis_ttl": 300},
                                  listeners=LISTENERS, pool=settings))
    return path


def load(path: Path) -> Organism:
    return load_organism(path, environ={"XP_SIGNING_KEY": SIGNING_KEY})


async def eventually(cond: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """Wait for a condition (a generous bound against hangs, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.05)


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def ask(to: str, payload: str) -> Message:
    return Message(sender="console", to=to, payload=payload)


def start_worker(path: Path, env: dict[str, str], tmp_path: Path, name: str, procs: list[Any],
                 *extra: str) -> subprocess.Popen[bytes]:
    p = cli_popen("worker", "--config", str(path), "--heartbeat-file", str(tmp_path / f"{name}.hb"), *extra,
                  env=env, log=tmp_path / f"{name}.log")
    procs.append(p)
    return p


async def test_sigkill_a_worker_mid_task_the_other_finishes_it_exactly_once(
        redis_server, prefix: str, tmp_path: Path, cli_env: dict[str, str], procs: list[Any]) -> None:  # type: ignore[no-untyped-def]
    # claim_idle 10x the heartbeat interval: a loaded CI machine may delay a heartbeat, not by 2 s.
    path = write_organism(tmp_path, redis_server.url, prefix, claim_idle_seconds=2.0)
    workers = [start_worker(path, cli_env, tmp_path, f"w{i}", procs) for i in range(2)]
    org = load(path)
    backend = create_backend(org.backend)
    dispatcher = RedisDispatcher(backend)
    markers = [tmp_path / f"m{i}" for i in range(2)]
    async with StreamPump(org, backend, dispatcher=dispatcher) as pump:
        jobs = [asyncio.create_task(pump.request(ask("slow", f'<s seconds="3" tag="{i}" marker="{m}"/>'), timeout=60))
                for i, m in enumerate(markers)]
        await eventually(lambda: all(lines(m) for m in markers), "both workers to start a task")
        victim = int(lines(markers[0])[0])
        survivor = next(w for w in workers if w.pid != victim)
        assert victim in {w.pid for w in workers} and lines(markers[1]) == [str(survivor.pid)]
        os.kill(victim, signal.SIGKILL)
        results = await asyncio.gather(*jobs)
    for i, outs in enumerate(results):
        assert len(outs) == 1, outs  # exactly one response per conversation
        (out,) = outs
        assert out.kind == "response" and out.element().get("tag") == str(i)  # type: ignore[union-attr]
        assert int(out.element().get("pid")) == survivor.pid  # type: ignore[union-attr]
    # The killed task ran again on the survivor; the other (longer than claim_idle, but heartbeating) once.
    assert lines(markers[0]) == [str(victim), str(survivor.pid)]
    assert lines(markers[1]) == [str(survivor.pid)]
    assert dispatcher.duplicates == 0
    streams = Streams(backend)
    client = redis_server.client()
    assert client.xlen(streams.tasks) == 0  # acknowledged tasks are trimmed
    assert client.xpending(streams.tasks, WORKER_GROUP)["pending"] == 0  # nothing lost
    assert list(client.scan_iter(match=f"{prefix}tmp:*")) == []
    backend.close()


async def test_a_task_that_keeps_failing_goes_to_the_dead_letter_stream(
        redis_server, prefix: str, tmp_path: Path, cli_env: dict[str, str], procs: list[Any]) -> None:  # type: ignore[no-untyped-def]
    path = write_organism(tmp_path, redis_server.url, prefix, max_attempts=3)
    start_worker(path, cli_env, tmp_path, "w", procs)
    org = load(path)
    backend = create_backend(org.backend)
    marker = tmp_path / "fail"
    async with StreamPump(org, backend, dispatcher=RedisDispatcher(backend)) as pump:
        request = ask("fail", f'<x marker="{marker}"/>')
        (out,) = await pump.request(request, timeout=60)
        (ok,) = await pump.request(ask("primes", '<count below="100"/>'), timeout=60)  # the worker goes on
    assert out.kind == "error" and out.in_reply_to == request.id
    assert 'type="DeadLetter"' in out.payload and "RuntimeError: boom" in out.payload and "failed 3 time" in out.payload
    assert len(lines(marker)) == 3  # max_attempts runs, then no more
    (dead,) = dead_letters(backend)
    assert dead["listener"] == "fail" and "RuntimeError: boom" in dead["error"]
    assert redis_server.client().ttl(Streams(backend).dlq) > 0
    assert ok.payload == '<primes below="100" count="25"/>'
    backend.close()


async def test_distributed_mode_over_tls(tls_redis, tls_files, prefix: str, tmp_path: Path,  # type: ignore[no-untyped-def]
                                        cli_env: dict[str, str], procs: list[Any],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # rediss://: the dispatcher's pipe, the worker process's own connection and the pool all speak
    # TLS, trusting the test CA like a system CA (SSL_CERT_FILE, in this process and the worker's).
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files.ca))
    path = write_organism(tmp_path, tls_redis.url, prefix)
    start_worker(path, {**cli_env, "SSL_CERT_FILE": str(tls_files.ca)}, tmp_path, "w", procs)
    org = load(path)
    backend = create_backend(org.backend)
    dispatcher = RedisDispatcher(backend)
    async with StreamPump(org, backend, dispatcher=dispatcher) as pump:
        assert pump.pipe is not None and cast(RedisStore, dispatcher.store).pipe is not None  # the fast path kept TLS
        outs = await asyncio.gather(*(pump.request(ask("primes", f'<count below="{n}"/>'), timeout=60)
                                      for n in (10, 100, 1000)))
        assert [o.payload for (o,) in outs] == ['<primes below="10" count="4"/>', '<primes below="100" count="25"/>',
                                               '<primes below="1000" count="168"/>']
        assert pump.stats.redis_fallbacks == 0
    backend.close()


async def test_a_task_that_kills_its_workers_is_dead_lettered(
        redis_server, prefix: str, tmp_path: Path, cli_env: dict[str, str], procs: list[Any]) -> None:  # type: ignore[no-untyped-def]
    path = write_organism(tmp_path, redis_server.url, prefix, max_attempts=2)
    # Two consumer processes under one supervisor, which replaces the ones that die.
    start_worker(path, cli_env, tmp_path, "sup", procs, "--processes", "2")
    org = load(path)
    backend = create_backend(org.backend)
    marker = tmp_path / "die"
    async with StreamPump(org, backend, dispatcher=RedisDispatcher(backend)) as pump:
        (out,) = await pump.request(ask("die", f'<x marker="{marker}"/>'), timeout=60)
        (ok,) = await pump.request(ask("echo", "<e/>"), timeout=60)
    assert out.kind == "error" and 'type="DeadLetter"' in out.payload and "died or stalled" in out.payload
    assert len(lines(marker)) == 2
    assert len(dead_letters(backend)) == 1
    assert ok.kind == "response"
    backend.close()


async def test_duplicate_results_are_dropped_at_the_pump(
        redis_server, prefix: str, tmp_path: Path, cli_env: dict[str, str], procs: list[Any]) -> None:  # type: ignore[no-untyped-def]
    path = write_organism(tmp_path, redis_server.url, prefix)
    start_worker(path, cli_env, tmp_path, "w", procs)
    org = load(path)
    backend = create_backend(org.backend)
    dispatcher = RedisDispatcher(backend)
    outputs: list[Message] = []
    async with StreamPump(org, backend, dispatcher=dispatcher, on_output=outputs.append) as pump:
        await pump.request(ask("echo", "<e/>"), timeout=60)
        (task_id,) = dispatcher.completed_ids
        # What a second run of the same task (a stalled worker coming back) would deliver:
        backend.temp_put("dup-response", b"late")
        redis_server.client().xadd(dispatcher.results_key,
                                   WorkerResult(task_id, response_key="dup-response", worker="late").to_fields())
        await eventually(lambda: dispatcher.duplicates == 1, "the duplicate to be dropped")
        await eventually(lambda: backend.temp_get("dup-response") is None, "the duplicate's response to be deleted")
    assert len(outputs) == 1
    backend.close()


def test_sigterm_drains_pump_and_worker_and_both_exit_0(
        redis_server, prefix: str, tmp_path: Path, cli_env: dict[str, str], procs: list[Any]) -> None:  # type: ignore[no-untyped-def]
    path = write_organism(tmp_path, redis_server.url, prefix)
    env = dict(cli_env, XP_CONFIG=str(path))
    pump = cli_popen("pump", "--heartbeat-file", str(tmp_path / "pump.hb"), env=env, log=tmp_path / "pump.log")
    procs.append(pump)
    worker = start_worker(path, env, tmp_path, "w", procs)
    # A round trip through ingress → pump → worker → pump → egress, as a user in a cluster would.
    r = cli("send", "--to", "greeter", '<greet name="Ada" lucky="1000"/>', "--wait", "--timeout", "60", env=env)
    assert r.returncode == 0, r.stderr
    assert "Hello, Ada! Your lucky number: there are 168 primes below 1000." in r.stdout
    assert cli("healthcheck", "--file", str(tmp_path / "pump.hb"), env=env).returncode == 0
    assert cli("healthcheck", "--file", str(tmp_path / "w.hb"), env=env).returncode == 0
    # A long task in flight, then SIGTERM to both: it still completes and reaches egress.
    marker = tmp_path / "slow"
    r = cli("send", "--to", "slow", f'<s seconds="1.5" marker="{marker}"/>', env=env)
    assert r.returncode == 0, r.stderr
    message_id = r.stdout.strip()
    deadline = time.monotonic() + 30
    while not lines(marker):
        assert time.monotonic() < deadline, (tmp_path / "pump.log").read_text()
        time.sleep(0.05)
    pump.send_signal(signal.SIGTERM)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0, (tmp_path / "w.log").read_text()
    assert pump.wait(30) == 0, (tmp_path / "pump.log").read_text()
    backend = create_backend(load(path).backend)
    egress = redis_server.client().xrange(Streams(backend).egress)
    answers = [f for _i, f in egress if f[b"in_reply_to"].decode() == message_id]
    assert len(answers) == 1 and answers[0][b"type"] == b"response"
    assert lines(marker) == [str(worker.pid)]
    log = (tmp_path / "pump.log").read_text()
    # At least the slow one (the first conversation may still be closing its ingress entry under load).
    assert re.search(r"draining [1-9]\d* conversation", log) and "pump stopped cleanly" in log
    assert "stopped after 2 task(s)" in (tmp_path / "w.log").read_text()
    backend.close()


async def test_distributed_mode_works_as_the_tenant_acl_user(
        redis_server, prefix: str, tmp_path: Path, cli_env: dict[str, str], procs: list[Any]) -> None:  # type: ignore[no-untyped-def]
    """Pump, worker and `send` need no command beyond what the operator grants an organism's user."""
    acl = pytest.importorskip("xml_pipeline_operator.tenancy.acl")
    functions = pytest.importorskip("xml_pipeline_operator.tenancy.functions")
    admin = redis_server.client()
    functions.ensure_library(admin)  # the tenant may FCALL the library's functions, never EVAL
    user, password = f"xpt-{prefix.split(':')[1]}", "tenant-password-0123456789"
    admin.execute_command("ACL", "SETUSER", user, "reset", "on", f">{password}",
                          *acl.acl_rules(prefix, available=acl.server_commands(admin)))
    try:
        path = write_organism(tmp_path, redis_server.url, prefix)
        env = dict(cli_env, XP_CONFIG=str(path), XP_REDIS_USERNAME=user, XP_REDIS_PASSWORD=password)
        start_worker(path, env, tmp_path, "w", procs)
        org = load_organism(path, environ={"XP_SIGNING_KEY": SIGNING_KEY, "XP_REDIS_USERNAME": user,
                                           "XP_REDIS_PASSWORD": password})
        backend = create_backend(org.backend)
        async with StreamPump(org, backend, dispatcher=RedisDispatcher(backend)) as pump:
            (out,) = await pump.request(ask("greeter", '<greet name="Ada" lucky="100"/>'), timeout=60)
            assert "there are 25 primes below 100" in out.payload
            (err,) = await pump.request(ask("fail", "<x/>"), timeout=60)  # requeue + dead-letter paths
            assert 'type="DeadLetter"' in err.payload
        backend.close()
        pump_proc = cli_popen("pump", "--heartbeat-file", str(tmp_path / "p.hb"), env=env, log=tmp_path / "p.log")
        procs.append(pump_proc)
        r = await asyncio.to_thread(cli, "send", "--to", "greeter", '<greet name="Acl"/>', "--wait", env=env)
        assert r.returncode == 0 and "Hello, Acl!" in r.stdout, (r.stderr, (tmp_path / "p.log").read_text())
        r = await asyncio.to_thread(cli, "backend", "info", "--json", env=env)
        assert r.returncode == 0, r.stderr
        pump_proc.send_signal(signal.SIGTERM)
        assert pump_proc.wait(30) == 0
        assert "NOPERM" not in (tmp_path / "w.log").read_text() + (tmp_path / "p.log").read_text()
    finally:
        admin.execute_command("ACL", "DELUSER", user)


async def test_a_pump_taking_over_repeats_neither_outputs_nor_buffer_entries(redis_server, prefix: str,  # type: ignore[no-untyped-def]
                                                                           tmp_path: Path) -> None:
    """The first pump runs a conversation (greeter calls the cpu_bound primes, then answers) and dies
    before acknowledging its ingress entry; the next pump takes the entry over and runs it again:
    the answer reaches egress once, every context buffer holds each message once, and the entry and
    the conversation's sent-record are gone afterwards."""
    from xml_pipeline.memory import ContextBuffer
    from xml_pipeline.message_bus.ingress import IngressBridge, send_message
    from xml_pipeline.message_bus.streams import PUMP_GROUP

    org = load(write_organism(tmp_path, redis_server.url, prefix))
    backend = create_backend(org.backend)
    raw = redis_server.client()
    streams = Streams(backend)
    message = ask("greeter", '<greet name="Once" lucky="100"/>')

    def answers() -> list[Any]:
        return [f for _i, f in raw.xrange(streams.egress) if f[b"in_reply_to"].decode() == message.id]

    def buffers() -> dict[str, list[str]]:
        buf = ContextBuffer(backend)
        return {t: [slot.payload.id for slot in buf.get_thread(t)] for t in backend.buffer_list_threads()}

    async with StreamPump(org, backend) as first:
        dying = IngressBridge(backend, first, claim_idle_seconds=0.2)

        async def crash_before_ack(entry_id: str, *, conversation: str) -> None:
            dying._slots.release()  # noqa: SLF001 - the process "dies": no XACK, no cleanup

        dying._ack = crash_before_ack  # type: ignore[method-assign]
        await dying.start()
        send_message(backend, message)
        await eventually(answers, "the first pump's answer")
        await dying.stop()
    assert len(answers()) == 1
    assert raw.xpending(streams.ingress, PUMP_GROUP)["pending"] == 1  # the entry is left unfinished
    stored = buffers()
    assert sum(len(ids) for ids in stored.values()) >= 4  # request, call, its answer, the answer

    async with StreamPump(org, backend) as second:
        taking_over = IngressBridge(backend, second, claim_idle_seconds=0.2)
        await taking_over.start()
        await eventually(lambda: raw.xpending(streams.ingress, PUMP_GROUP)["pending"] == 0,
                         "the second pump to finish the conversation")
        await taking_over.stop()
    assert second.stats.conversations == 1 and second.stats.worker_tasks == 1  # it really ran it again
    (answer,) = answers()  # written once, by the first pump
    assert b"there are 25 primes below 100" in answer[b"xml"]
    assert not raw.exists(backend.key("egress", "sent", message.id))
    assert buffers() == stored  # the re-run's appends were recognised as repeats
    backend.close()


def test_pump_serves_prometheus_metrics(redis_server, prefix: str, tmp_path: Path,  # type: ignore[no-untyped-def]
                                        cli_env: dict[str, str], procs: list[Any]) -> None:
    import urllib.error
    import urllib.request

    from redis_server import free_port

    path = write_organism(tmp_path, redis_server.url, prefix)
    env = dict(cli_env, XP_CONFIG=str(path))
    port = free_port()
    pump = cli_popen("pump", "--heartbeat-file", str(tmp_path / "pump.hb"), "--metrics-port", str(port),
                     env=env, log=tmp_path / "pump.log")
    procs.append(pump)
    start_worker(path, env, tmp_path, "w", procs)
    r = cli("send", "--to", "greeter", '<greet name="Ada" lucky="100"/>', "--wait", "--timeout", "60", env=env)
    assert r.returncode == 0, r.stderr + (tmp_path / "pump.log").read_text()

    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:  # the pump answered, so it is serving
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if not line.startswith("#")}
    org = '{organism="dist"}'
    assert values[f"xp_pump_conversations_total{org}"] == 1
    assert values[f"xp_pump_worker_tasks_total{org}"] == 1  # greeter asked the cpu_bound primes
    assert values[f"xp_pump_messages_total{org}"] >= 3 and values[f"xp_pump_errors_total{org}"] == 0
    assert values['xp_stream_length{organism="dist",stream="tasks"}'] == 0  # done tasks are trimmed
    assert "# TYPE xp_pump_messages_total counter" in text
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10)
    assert e.value.code == 404
    pump.send_signal(signal.SIGTERM)
    assert pump.wait(30) == 0


def test_pump_metrics_port_is_checked() -> None:
    r = cli("pump", "--metrics-port", "70000", env=dict(os.environ))
    assert r.returncode == 2 and "--metrics-port" in r.stderr and "0..65535" in r.stderr
