"""The KEDA trigger the operator generates, checked against a real Redis under a real burst.

A real redis-server (the shared one, with an admin), the organism's tenant ACL user made by
tenancy.acl, real `xml-pipeline worker` processes and a pump in this process. During a burst we read,
as the scaler does and with the scaler's credentials (the organism's user: the TriggerAuthentication
points at the same Secret keys), the figures of the two generated triggers -- XLEN of the tasks stream
and XPENDING of the `workers` group -- and apply KEDA's documented formula: per trigger
ceil(metric / target), the largest wins, clamped to [minReplicaCount, maxReplicaCount]; zero
replicas only while no trigger is active (metric 0)."""
from __future__ import annotations

import asyncio
import math
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis_server import RedisServer

from xml_pipeline.memory import create_backend
from xml_pipeline.message_bus.dispatcher import RedisDispatcher
from xml_pipeline.message_bus.streams import WORKER_GROUP, Streams
from xml_pipeline.message_bus.message import Message
from xml_pipeline.message_bus.stream_pump import StreamPump
from xml_pipeline.organism import load_organism
from xml_pipeline_operator.desired import scaling
from xml_pipeline_operator.model import parse_organism
from xml_pipeline_operator.settings import OperatorSettings
from xml_pipeline_operator.tenancy import acl, functions

ROOT = Path(__file__).resolve().parents[2]
PUMP_TESTS = ROOT / "tests" / "pump"
SIGNING_KEY = "scaler-tests-signing-key-0123456789"
BURST, TARGET, MAX = 12, 4, 8


@pytest.fixture
def shared() -> Iterator[RedisServer]:
    server = RedisServer(password="admin-" + secrets.token_hex(6)).start()
    yield server
    server.cleanup()


def keda_replicas(metrics_and_targets: list[tuple[int, int]], low: int, high: int, current: int) -> int:
    """KEDA's documented behaviour: inactive (every metric 0) -> minReplicaCount (0 allowed); active ->
    the HPA's ceil(metric / target) per metric (AverageValue), the largest, clamped, at least 1."""
    if all(m == 0 for m, _ in metrics_and_targets):
        return low
    want = max(math.ceil(m / t) for m, t in metrics_and_targets)
    return max(1, low, min(high, want))


def scaler_read(client: redis.Redis, triggers: list[dict[str, str]]) -> tuple[int, int]:
    """Exactly what the two redis-streams triggers read: XLEN (no consumerGroup) and XPENDING."""
    backlog, running = triggers
    length = int(client.xlen(backlog["stream"]))
    pending = int(client.xpending(running["stream"], running["consumerGroup"])["pending"])
    return length, pending


async def test_scaler_figures_under_a_burst_with_the_tenant_user(shared: RedisServer, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"burst{uuid.uuid4().hex[:6]}"
    prefix = f"xp:t.{name}:"
    username, password = acl.username_for("t", name), secrets.token_urlsafe(24)
    admin = shared.client()
    functions.ensure_library(admin)  # as the operator does on a shared Redis: tenants FCALL, never EVAL
    acl.ensure_user(admin, username, password, prefix)

    # The Organism as the operator sees it, and the triggers it generates for it.
    body = {"metadata": {"name": name, "namespace": "t", "uid": "u"}, "spec": {
        "config": {"listeners": [{"name": "slow", "handler": "xp_test_handlers:slow", "cpu_bound": True}]},
        "backend": {"redis": {"mode": "external", "prefix": prefix, "external": {
            "url": shared.url, "passwordSecretRef": {"name": "s"}, "usernameSecretRef": {"name": "u"}}}},
        "workers": {"processes": 1, "autoscaling": {"minReplicas": 0, "maxReplicas": MAX, "tasksPerReplica": TARGET}}}}
    org = parse_organism(body, OperatorSettings())
    triggers = scaling.trigger_metadata(org, shared.url)
    assert triggers[0]["stream"] == triggers[1]["stream"] == f"{prefix}tasks"
    assert triggers[1]["consumerGroup"] == WORKER_GROUP

    path = tmp_path / "organism.yaml"
    path.write_text(
        f"organism: {{name: {name}}}\n"
        f"backend: {{type: redis, redis_url: '{shared.url}', redis_prefix: '{prefix}', redis_ttl: 300,\n"
        f"          redis_username: '{username}', redis_password: '{password}'}}\n"
        "process_pool: {workers: 1, claim_idle_seconds: 5.0, heartbeat_seconds: 0.5, drain_seconds: 5}\n"
        "listeners:\n  - {name: slow, handler: 'xp_test_handlers:slow', cpu_bound: true}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("XP_")}
    env.update(PYTHONPATH=os.pathsep.join([str(PUMP_TESTS), str(ROOT / "library"), env.get("PYTHONPATH", "")]),
               XP_SIGNING_KEY=SIGNING_KEY, PYTHONUNBUFFERED="1")
    worker = subprocess.Popen([sys.executable, "-m", "xml_pipeline.cli", "worker", "--config", str(path)],
                              env=env, stdout=(tmp_path / "w.log").open("wb"), stderr=subprocess.STDOUT, cwd=ROOT)
    scaler = redis.Redis.from_url(shared.url, username=username, password=password, socket_timeout=5)
    seen: list[tuple[int, int, int]] = []
    try:
        monkeypatch.syspath_prepend(str(PUMP_TESTS))  # xp_test_handlers, for the pump's own imports
        organism = load_organism(path, environ={"XP_SIGNING_KEY": SIGNING_KEY})
        backend = create_backend(organism.backend)
        assert triggers[0]["stream"] == Streams(backend).tasks  # the very stream the workers consume
        async with StreamPump(organism, backend, dispatcher=RedisDispatcher(backend)) as pump:
            jobs = [asyncio.create_task(pump.request(Message(sender="console", to="slow",
                                                             payload=f'<s seconds="0.4" tag="{i}"/>'), timeout=120))
                    for i in range(BURST)]
            deadline = time.monotonic() + 120
            while not all(j.done() for j in jobs) and time.monotonic() < deadline:
                length, pending = scaler_read(scaler, triggers)
                replicas = keda_replicas([(length, TARGET), (pending, org.workers.processes)], 0, MAX, 1)
                seen.append((length, pending, replicas))
                # The stream holds only unfinished tasks: delivered-but-unacked never exceeds it, and
                # with one single-process worker at most one task is running.
                assert pending <= length and pending <= 1
                await asyncio.sleep(0.05)
            outs = await asyncio.gather(*jobs)
        assert all(out.kind != "error" for (out,) in outs)
        backend.close()
        # Idle: both triggers read 0, KEDA deactivates and scales to minReplicaCount 0.
        assert scaler_read(scaler, triggers) == (0, 0)
        assert keda_replicas([(0, TARGET), (0, 1)], 0, MAX, 1) == 0
    finally:
        worker.terminate()
        worker.wait(30)
    peak = max(seen)
    print(f"burst of {BURST}: peak XLEN {peak[0]}, XPENDING {peak[1]} -> {peak[2]} replicas "
          f"(ceil({peak[0]}/{TARGET}), max {MAX}); samples {len(seen)}")
    assert peak[0] >= BURST - 2  # the burst was queued faster than one worker drains it
    assert peak[2] == min(MAX, math.ceil(peak[0] / TARGET)) and peak[2] >= 2  # the backlog asks for more pods

    # The scaler's credentials: the figures above were read with them; nothing outside the prefix.
    other = f"xp:t.other{uuid.uuid4().hex[:4]}:tasks"
    admin.xadd(other, {"x": "1"})
    for denied in (lambda: scaler.xlen(other), lambda: scaler.xpending(other, WORKER_GROUP),
                   lambda: scaler.keys("*"), lambda: scaler.config_get("*"), lambda: scaler.execute_command("INFO")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            denied()
    # What it may run beyond the triggers' reads: INFO server (the server version) and its own prefix.
    assert scaler.info("server")["redis_version"]
    scaler.close()
    admin.close()
