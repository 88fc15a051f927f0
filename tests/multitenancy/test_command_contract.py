"""The Redis commands the contract declares are exactly the ones the library sends.

A private server counts every command (INFO commandstats counts what Lua functions call as well)
while a workload runs every library path: the SharedBackend contract with ContextBuffer and
ThreadRegistry, reindex, a pump and a worker process on Redis Streams (a call through the task
stream, a long task the heartbeat re-claims, a failing task retried then dead-lettered, a task of a
killed worker reclaimed by the next), `send` through ingress/egress, and the inspection tools.
Nothing sent may be missing from the contract, and nothing declared may go unsent.
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any
from pathlib import Path

import pytest
from redis_server import RedisServer

from xml_pipeline import contract
from xml_pipeline.memory import BackendConfig
from xml_pipeline.memory.redis_backend import RedisBackend
from xml_pipeline.message_bus import ingress, streams as stream_mod, worker as worker_mod, worker_task
from xml_pipeline.message_bus.message import Message
from xml_pipeline_operator.tenancy import acl, functions

from .test_library_restricted import exercise

CLI = str(Path(sys.executable).with_name("xml-pipeline"))
SIGNING_KEY = secrets.token_hex(16)
PREFIX = "xp:t.commands:"

ORGANISM_YAML = """\
organism:
  name: commands
backend:
  type: redis
process_pool:
  workers: 1
  max_attempts: 2
  claim_idle_seconds: 1.5
  heartbeat_seconds: 0.2
listeners:
  - name: greeter
    handler: "xml_pipeline.examples.greeter:handle"
  - name: primes
    handler: "xml_pipeline.examples.cpu:count_primes"
    cpu_bound: true
  - name: burn
    handler: "xml_pipeline.examples.cpu:burn"
    cpu_bound: true
  - name: broken
    handler: "contract_handlers:broken"
    cpu_bound: true
  - name: slow
    handler: "contract_handlers:slow"
    cpu_bound: true
"""
HANDLERS = '''\
import time


def broken(message):
    raise RuntimeError("this handler always fails")


def slow(message):
    time.sleep(float(message.element().get("seconds", "1")))
    return "<slept/>"
'''


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.cleanup()


def _start(role: str, env: dict[str, str], tmp_path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([CLI, role, "--heartbeat-file", str(tmp_path / f"{role}.hb")],
                            env={**env, contract.ENV_ROLE: role}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _stop(p: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> str:
    p.send_signal(sig)
    try:
        _, err = p.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
    return err.decode(errors="replace")


def _wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _used(server: RedisServer) -> set[str]:
    admin = server.client()
    try:
        return {name.removeprefix("cmdstat_").lower() for name in admin.info("commandstats")}
    finally:
        admin.close()


@pytest.mark.timeout(150)
def test_the_declared_commands_are_exactly_the_ones_the_library_sends(private_redis: RedisServer,
                                                                      tmp_path: Path) -> None:
    if not Path(CLI).exists():
        pytest.skip("the xml-pipeline console script is not installed in this environment")
    admin = private_redis.client()
    functions.ensure_library(admin)  # as the operator does on a shared Redis
    admin.config_resetstat()
    admin.close()
    cfg = BackendConfig(backend_type="redis", redis_url=private_redis.url, redis_prefix=PREFIX,
                        redis_ttl=600, signing_key=SIGNING_KEY)

    # 1. The SharedBackend contract, ContextBuffer, ThreadRegistry; reindex.
    with RedisBackend(cfg) as b:
        exercise(b)
        assert b.script_mechanism == "fcall"
        b.buffer_append("t-r", b"x")
        assert b.reindex()
    library_only = _used(private_redis)

    # 2. Pump and worker processes, as the pods run them.
    (tmp_path / "organism.yaml").write_text(ORGANISM_YAML)
    (tmp_path / "contract_handlers.py").write_text(HANDLERS)
    env = {**os.environ, contract.ENV_ORGANISM: "commands", contract.ENV_CONFIG: str(tmp_path / "organism.yaml"),
           contract.ENV_BACKEND_TYPE: "redis", contract.ENV_REDIS_URL: private_redis.url,
           contract.ENV_REDIS_PREFIX: PREFIX, contract.ENV_REDIS_TTL: "600", contract.ENV_SIGNING_KEY: SIGNING_KEY,
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    pump = _start("pump", env, tmp_path)
    worker = _start("worker", env, tmp_path)
    errors: dict[str, str] = {}
    try:
        with RedisBackend(cfg) as b:
            def send(to: str, payload: str, wait: float = 45) -> Message | None:
                return ingress.send_message(b, Message(sender="console", to=to, payload=payload), wait=wait)

            # A call from the pump (greeter) through the task stream (primes in the worker).
            reply = send("greeter", '<greet name="Ada" lucky="100"/>')
            assert reply is not None and "25 primes below 100" in reply.text(), reply
            # A task running for many heartbeats: the heartbeat function re-claims it.
            assert send("slow", '<sleep seconds="1"/>') is not None
            # A failing task: retried (max_attempts 2), then dead-lettered.
            send("broken", "<boom/>", wait=5)
            _wait_for(lambda: stream_mod.dead_letters(b), 30, "a dead letter")
            assert stream_mod.stream_info(b)["dlq"]
            # A worker killed in the middle of a task: the next worker reclaims it.
            send("slow", '<sleep seconds="3"/>', wait=0)
            streams = stream_mod.Streams(b)

            def pending() -> list[dict[str, object]]:
                return list(streams.client.xpending_range(streams.tasks, stream_mod.WORKER_GROUP, "-", "+", 1))

            _wait_for(pending, 30, "the slow task in the worker's hands")
            _stop(worker, signal.SIGKILL)
            worker = _start("worker", env, tmp_path)
            _wait_for(lambda: (p := pending()) and int(p[0]["times_delivered"]) >= 2, 30,  # type: ignore[call-overload]
                      "the new worker to reclaim the task")
            # The reclaimed task finishes; a worker holding nothing leaves the group when it stops.
            _wait_for(lambda: not pending(), 30, "the reclaimed task to finish")
            # A dead worker process's tasks, released at once by its supervisor (`worker --processes N`):
            # the release function of the library, for a consumer that holds a task and is gone.
            send("slow", '<sleep seconds="1"/>', wait=0)
            _wait_for(pending, 30, "a task in the worker's hands")
            entry = pending()[0]["message_id"]
            streams.client.xclaim(streams.tasks, stream_mod.WORKER_GROUP, "gone-worker", 0, [entry])
            assert worker_mod.release_consumer(b, "gone-worker", max_attempts=5) == (1, 0)
            _wait_for(lambda: not pending(), 30, "the released task to finish")
            # A task in the temp-key form (what a pump of an earlier release sends): the worker
            # fetches its inputs (MGET) and stores the response under a temp key (SET).
            pk, mk = worker_task.store_inputs(b, Message("console", "primes", '<count below="50"/>', thread="t"))
            reply_to = streams.results("earlier-pump")
            streams.client.xadd(streams.tasks, worker_task.WorkerTask(  # type: ignore[arg-type]
                "old-form", "primes", "xml_pipeline.examples.cpu:count_primes", pk, mk, reply_to=reply_to).to_fields())
            _wait_for(lambda: streams.client.xrange(reply_to), 30, "the temp-key task's result")
            ((_, fields),) = streams.client.xrange(reply_to)
            result = worker_task.WorkerResult.from_fields(fields)
            assert result.ok and result.response_key is not None, result
            (answer,) = worker_task.take_response(b, result.response_key, [pk, mk])
            assert 'count="15"' in answer.payload, answer
    finally:
        for role, p in (("worker", worker), ("pump", pump)):
            errors[role] = _stop(p)
    for role, err in errors.items():
        # The only tracebacks are the broken handler's own (logged with each failed attempt).
        for chunk in err.split("Traceback")[1:]:
            assert "this handler always fails" in chunk.split("\n\n")[0], f"{role}: {chunk[:2000]}"

    used = _used(private_redis)
    used -= {"config|resetstat", "hello", "auth", "function|load", "function|list"}  # the test's own
    # The library sends INFO for its `server` section only (what the ACL grants); the test's INFO
    # commandstats counts under the same name, and the backend's info() is part of the workload.
    used = {"info|server" if c == "info" else c for c in used}
    declared = contract.LIBRARY_COMMANDS | contract.REINDEX_COMMANDS
    sent_unknown = {c for c in used if c not in declared}
    assert not sent_unknown, f"the library sends commands the contract does not declare: {sorted(sent_unknown)}"
    # CLIENT SETINFO exists on Redis >= 7.2 only; redis-py sends it where it does.
    never_sent = declared - used - contract.CONNECT_COMMANDS
    assert not never_sent, f"the contract declares commands the library never sends: {sorted(never_sent)}"
    # Scripts ran as FCALL: no EVAL on a server with the function library.
    assert not used & contract.EVAL_COMMANDS
    # The backend alone stays within its own set.
    assert {"info|server" if c == "info" else c for c in library_only} - {"config|resetstat", "function|load",
                                                                            "function|list", "hello"} \
        <= contract.BACKEND_COMMANDS | contract.REINDEX_COMMANDS | contract.CONNECT_COMMANDS  # SETINFO: redis-py, on 7.2+
    # And the tenant ACL grants exactly the library's set.
    assert set(acl.ORGANISM_COMMANDS) == contract.LIBRARY_COMMANDS


def _sent_on(nodes: list[Any]) -> set[str]:
    """What was called on `nodes` since their last CONFIG RESETSTAT (INFO counts as info|server)."""
    seen: set[str] = set()
    for n in nodes:
        c = n.client()
        try:
            for name, stats in c.info("commandstats").items():
                if int(stats["calls"]) - int(stats.get("rejected_calls", 0)) > 0:
                    seen.add(name.removeprefix("cmdstat_").lower())
        finally:
            c.close()
    # The test's own admin connections (INFO, HELLO, CONFIG RESETSTAT) and the replicas' acknowledgements.
    return {"info|server" if c == "info" else c for c in seen} - {"config|resetstat", "hello", "replconf"}


def _reset(nodes: list[Any]) -> None:
    for n in nodes:
        c = n.client()
        c.config_resetstat()
        c.close()


@pytest.mark.cluster
@pytest.mark.timeout(120)
def test_on_a_cluster_the_backend_and_the_client_send_the_declared_commands(shared_cluster: Any) -> None:
    """On a real 3 + 3 cluster with the function library loaded (as the operator does): the backend
    sends LIBRARY_COMMANDS plus CLUSTER_COMMANDS and nothing else; the client API sends
    contract.client_commands("cluster") and nothing else; the topology commands are really sent."""
    from xml_pipeline.client import NoAnswer, OrganismClient
    from xml_pipeline.memory import ContextBuffer
    from xml_pipeline.memory.redis_functions import library

    masters = shared_cluster.masters()  # replicas count the replication stream, not the clients
    lib = library()
    for m in masters:
        c = m.client()
        functions.ensure_library(c)
        c.close()
    prefix = f"xp:t.cc{secrets.token_hex(3)}:"
    cfg = BackendConfig(backend_type="redis", redis_url=shared_cluster.url, redis_prefix=prefix, redis_ttl=600,
                        signing_key=SIGNING_KEY)
    try:
        _reset(masters)
        with RedisBackend(cfg) as b:
            assert b.script_mechanism in (None, "fcall")
            exercise(b)
            buffer = ContextBuffer(b)
            for i in range(12):  # threads in every master's slots, so each one sees the handshake
                buffer.append(f"t-c{i}", "<x/>", "console", "greeter")
            b.registry_set("console.greeter", "t-c0")
            assert b.script_mechanism == "fcall"
        backend_sent = _sent_on(masters)
        assert backend_sent <= contract.LIBRARY_COMMANDS | contract.CLUSTER_COMMANDS, \
            sorted(backend_sent - contract.LIBRARY_COMMANDS - contract.CLUSTER_COMMANDS)
        # COMMAND GETKEYS only for movable-key commands ClusterClient does not parse (none on this path).
        assert {"cluster|slots", "command", "pexpire", "fcall"} <= backend_sent
        assert not backend_sent & contract.EVAL_COMMANDS

        _reset(masters)
        with OrganismClient(cfg) as client:
            with pytest.raises(NoAnswer):  # no pump here: sent, and waited for in vain
                client.request(Message(sender="console", to="greeter", payload="<hello/>"), timeout=0.3)
            assert client.read_thread("t-c3") and client.thread_of("console.greeter") == "t-c0"
            assert client.chain_of("t-c0") == "console.greeter" and "t-c5" in client.threads()
        client_sent = _sent_on(masters)
        granted = set(contract.client_commands("cluster"))
        assert client_sent <= granted, sorted(client_sent - granted)
        # ASKING only during a slot migration (tests/faults resharding), COMMAND GETKEYS only for a
        # movable-key command ClusterClient does not parse; the rest of the handshake here.
        assert contract.CLUSTER_TOPOLOGY_COMMANDS - {"asking", "command|getkeys"} <= client_sent
        # And the tenant's grant on a cluster node is exactly the library's sets.
        assert set(acl.granted_commands(cluster=True)) == contract.LIBRARY_COMMANDS - contract.CONNECT_COMMANDS \
            | contract.CLUSTER_COMMANDS
    finally:
        with RedisBackend(cfg) as b:
            b.buffer_clear()
            b.registry_clear()
        for m in masters:
            c = m.client()
            c.execute_command("FUNCTION", "DELETE", lib.name)
            c.close()
