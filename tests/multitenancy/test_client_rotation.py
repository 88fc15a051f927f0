"""Rotating the client password (dedicated Redis; the client wait on the shared Redis): the real kopf operator on kmock, and
a real redis-server started by the very script of the operator's Redis Deployment (its `requirepass` and
client `user` line from the Secrets, as the pod gets them). Redis accepts the new password before the
binding hands it out; old and new both work until every client workload has restarted with the new one
(or, mounting the binding, until the kubelet refreshed it); then only the new one works."""
from __future__ import annotations

import asyncio
import base64
import datetime
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis_server import free_port, server_binary

from xml_pipeline_operator.desired import binding as b
from xml_pipeline_operator.desired import redis as redis_desired

from . import test_operator_shared as base
from . import test_rotation as rot

k8s, kubeconfig, start_operator = base.k8s, base.kubeconfig, base.start_operator
harness, create, get_obj, eventually, condition = base.harness, base.create, base.get_obj, base.eventually, base.condition
ORGANISMS, DEPLOYMENTS, LISTENERS, MERGE = base.ORGANISMS, base.DEPLOYMENTS, base.LISTENERS, base.MERGE
USER = "xpc-default.ded"


def secret(k8s: Any, name: str) -> dict[str, str]:
    obj = get_obj(k8s, "v1/secrets", name)
    assert obj is not None, name
    return {k: base64.b64decode(v).decode() for k, v in obj["data"].items()}


class PodRedis:
    """The dedicated Redis pod's container, run here: its command from the Deployment, its environment
    from the Secrets it references; only the port and the data directory are local."""

    def __init__(self, k8s: Any, organism: str, tmp: Path) -> None:
        self.k8s, self.organism, self.tmp = k8s, organism, tmp
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "PodRedis":
        dep = get_obj(self.k8s, DEPLOYMENTS, f"{self.organism}-redis")
        assert dep is not None
        container = dep["spec"]["template"]["spec"]["containers"][0]
        script = container["command"][2]
        script = (script.replace("exec redis-server -", f"exec {server_binary().path} -")
                  .replace("--port 6379", f"--port {self.port} --bind 127.0.0.1")
                  .replace("--dir /data", f"--dir {self.tmp}"))
        env = {"PATH": os.environ.get("PATH", "")}
        for e in container["env"]:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = secret(self.k8s, ref["name"])[ref["key"]]
        self.admin_password = env["REDIS_PASSWORD"]
        self.proc = subprocess.Popen(["sh", "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if can_login(self, "default", self.admin_password):
                return self
            assert self.proc.poll() is None, "the Redis start script exited"
            time.sleep(0.05)
        raise AssertionError("the dedicated Redis did not answer")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)
        self.proc = None


def can_login(server: Any, username: str, password: str) -> bool:
    c = redis.Redis.from_url(server.url, username=username, password=password, socket_timeout=5,
                             socket_connect_timeout=1)
    try:
        return bool(c.ping())
    except (redis.AuthenticationError, redis.ConnectionError):
        return False
    finally:
        c.close()


@pytest.fixture
def pod_redis(k8s: Any, tmp_path: Path) -> Iterator[Any]:
    started: list[PodRedis] = []

    def start(organism: str) -> PodRedis:
        server = PodRedis(k8s, organism, tmp_path).start()
        started.append(server)
        return server
    yield start
    for s in started:
        s.stop()


def utc(offset: float = 0.0) -> str:
    t = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=offset)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


async def client_deployment(k8s: Any, name: str, organism: str, *, mode: str | None = None) -> None:
    annotations = {"xml-pipeline.dev/client-inject": mode} if mode else {}
    resp = await k8s.post("/apis/apps/v1/namespaces/default/deployments", json={
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "generation": 1},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name, "xml-pipeline.dev/client": organism},
                                           "annotations": annotations},
                              "spec": {"containers": [{"name": "web", "image": "example/web:1"}]}}}})
    assert resp.status == 201, await resp.text()


async def rollout_restart(k8s: Any, name: str) -> None:
    """What `kubectl rollout restart` and then the Deployment controller do."""
    resp = await k8s.patch(f"/apis/apps/v1/namespaces/default/deployments/{name}", headers=MERGE, json={
        "spec": {"template": {"metadata": {"annotations": {b.RESTARTED_AT_ANNOTATION: utc(1)}}}}})
    assert resp.status == 200, await resp.text()
    await rot.mark_rolled(k8s, name)


async def run_pass(op: Any, name: str) -> None:
    await asyncio.get_running_loop().run_in_executor(None, op.reconciler.reconcile, "default", name)


def client_condition(k8s: Any, name: str) -> dict[str, Any] | None:
    return condition(get_obj(k8s, ORGANISMS, name), "ClientCredentialsCurrent")


async def test_client_password_rotates_on_a_dedicated_redis(k8s: Any, start_operator: Any, pod_redis: Any) -> None:
    op = await start_operator()
    await create(k8s, "ded", {"config": {"listeners": LISTENERS}, "backend": {"redis": {"mode": "dedicated"}}})
    await eventually(lambda: ((get_obj(k8s, ORGANISMS, "ded") or {}).get("status") or {}).get("binding"))
    await eventually(lambda: get_obj(k8s, DEPLOYMENTS, "ded-redis"))
    server = pod_redis("ded")
    op.reconciler.dedicated.resolve = lambda endpoint: server.url if endpoint.startswith("redis://ded-redis.") else endpoint
    old = secret(k8s, "ded-binding")["password"]
    assert can_login(server, USER, old)  # the config's user line
    await client_deployment(k8s, "web", "ded")
    await client_deployment(k8s, "idle", "ded")
    await k8s.patch("/apis/apps/v1/namespaces/default/deployments/idle", headers=MERGE, json={"spec": {"replicas": 0}})
    await client_deployment(k8s, "unrelated", "other")

    await rot.request_rotation(k8s, "ded", "r1")
    new = await eventually(lambda: (p := secret(k8s, "ded-binding")["password"]) != old and p)
    values = secret(k8s, "ded-binding")
    assert "password-next" not in values and values["rotated-for"] == "r1" and values["rotated-at"]
    assert can_login(server, USER, new) and can_login(server, USER, old)  # both, while clients may hold the old
    cond = await eventually(lambda: client_condition(k8s, "ded"))
    assert (cond["status"], cond["reason"]) == ("False", "WaitingForClients")
    assert "Deployment/web" in cond["message"] and "idle" not in cond["message"] and "unrelated" not in cond["message"]
    assert rot.rotation_status(k8s, "ded") == {"phase": "Idle", "request": "r1"}  # acted upon: no event loop

    # A Redis restart meanwhile starts with the binding's password only; the next pass accepts the old again.
    server.stop()
    server.start()
    assert not can_login(server, USER, old)
    await run_pass(op, "ded")
    assert can_login(server, USER, old) and can_login(server, USER, new)

    await rollout_restart(k8s, "web")
    await run_pass(op, "ded")
    assert not can_login(server, USER, old) and can_login(server, USER, new)
    values = secret(k8s, "ded-binding")
    assert "password-previous-sha256" not in values and "rotated-at" not in values
    assert client_condition(k8s, "ded") is None
    # The handler's pass that published posted it as an event (passes run here directly post none).
    await eventually(lambda: any(e.get("reason") == "ClientCredentialsRotation" and "accepts the new" in e["message"]
                                 for n in harness.live_names(k8s, "v1/events")
                                 if (e := get_obj(k8s, "v1/events", n))))
    # One rotation per request: further passes change nothing.
    await run_pass(op, "ded")
    assert secret(k8s, "ded-binding")["password"] == new


async def test_binding_mounts_wait_for_the_kubelet_and_a_hand_replaced_password_applies_at_once(
        k8s: Any, start_operator: Any, pod_redis: Any) -> None:
    op = await start_operator()
    await create(k8s, "ded", {"config": {"listeners": LISTENERS}, "backend": {"redis": {"mode": "dedicated"}}})
    await eventually(lambda: get_obj(k8s, DEPLOYMENTS, "ded-redis") and get_obj(k8s, "v1/secrets", "ded-binding"))
    server = pod_redis("ded")
    op.reconciler.dedicated.resolve = lambda endpoint: server.url
    op.reconciler.binding_sync = 1.0
    await client_deployment(k8s, "mounted", "ded", mode="binding")
    old = secret(k8s, "ded-binding")["password"]
    await rot.request_rotation(k8s, "ded", "r1")
    new = await eventually(lambda: (p := secret(k8s, "ded-binding")["password"]) != old and p)
    assert can_login(server, USER, old)
    await asyncio.sleep(2.2)  # rotated-at has one-second resolution: more than binding_sync after it
    await run_pass(op, "ded")
    assert not can_login(server, USER, old) and can_login(server, USER, new)

    # Deleting the password key: a new password, accepted by the running Redis at once, the old one not.
    resp = await k8s.patch("/api/v1/namespaces/default/secrets/ded-binding", json={"data": {"password": None}},
                           headers=MERGE)
    assert resp.status == 200
    await run_pass(op, "ded")
    replaced = secret(k8s, "ded-binding")["password"]
    assert replaced != new and can_login(server, USER, replaced) and not can_login(server, USER, new)


async def test_unreachable_dedicated_redis_keeps_the_password_in_use(k8s: Any, start_operator: Any) -> None:
    op = await start_operator()
    await create(k8s, "ded", {"config": {"listeners": LISTENERS}, "backend": {"redis": {"mode": "dedicated"}}})
    await eventually(lambda: get_obj(k8s, "v1/secrets", "ded-binding"))
    op.reconciler.dedicated.resolve = lambda endpoint: f"redis://127.0.0.1:{free_port()}/0"
    old = secret(k8s, "ded-binding")["password"]
    await rot.request_rotation(k8s, "ded", "r1")
    cond = await eventually(lambda: client_condition(k8s, "ded"))
    assert (cond["status"], cond["reason"]) == ("False", "DedicatedRedisUnavailable")
    values = secret(k8s, "ded-binding")
    assert values["password"] == old and values["password-next"]  # durable, published only once Redis accepts it
    assert values["password-next"] not in cond["message"]


def test_stale_clients_rules() -> None:
    now, published = "2026-01-01T00:10:00Z", "2026-01-01T00:05:00Z"

    def dep(name: str, *, restarted: str | None = None, created: str = "2026-01-01T00:00:00Z", mode: str | None = None,
            rolled: bool = True, replicas: int = 1, organism: str = "ded") -> dict[str, Any]:
        ann = {b.RESTARTED_AT_ANNOTATION: restarted} if restarted else {}
        if mode:
            ann["xml-pipeline.dev/client-inject"] = mode
        n = replicas if rolled else 0
        return {"kind": "Deployment", "metadata": {"name": name, "generation": 2, "creationTimestamp": created},
                "spec": {"replicas": replicas, "template": {"metadata": {
                    "labels": {"xml-pipeline.dev/client": organism}, "annotations": ann}}},
                "status": {"observedGeneration": 2, "replicas": replicas, "updatedReplicas": n, "availableReplicas": n}}
    ws = [dep("old"), dep("restarted", restarted="2026-01-01T00:06:00Z"),
          dep("restarting", restarted="2026-01-01T00:06:00Z", rolled=False),
          dep("new", created="2026-01-01T00:07:00Z"), dep("mounted", mode="binding"), dep("zero", replicas=0),
          dep("other", organism="x")]
    assert b.stale_clients(ws, "ded", published, now) == ["Deployment/old", "Deployment/restarting"]
    assert "Deployment/mounted" in b.stale_clients(ws, "ded", published, "2026-01-01T00:06:00Z")
    assert b.dedicated_rotation_step("r1", {"password": "p"}) == "generate"
    assert b.dedicated_rotation_step("r1", {"password": "p", "rotated-for": "r1"}) is None
    assert b.dedicated_rotation_step(None, {"password": "p", "password-next": "n"}) == "publish"
    assert b.dedicated_rotation_step("r1", {"password": "p", "rotated-for": "r1",
                                            "password-previous-sha256": "ab" * 32}) == "overlap"


def test_the_dedicated_redis_admits_the_operator() -> None:
    from xml_pipeline_operator.model import parse_organism
    from xml_pipeline_operator.settings import OperatorSettings
    org = parse_organism({"metadata": {"name": "ded", "namespace": "shop"},
                          "spec": {"config": {"listeners": LISTENERS}}}, OperatorSettings())
    policy = redis_desired.redis_network_policy(org)
    peers = [p for rule in policy["spec"]["ingress"] for p in rule["from"]]
    assert {"namespaceSelector": {}, "podSelector": {"matchLabels": {
        "app.kubernetes.io/part-of": "xml-pipeline", "app.kubernetes.io/component": "operator"}}} in peers


shared, admin_client, run_operator = base.shared, base.admin_client, base.run_operator


async def test_shared_rotation_waits_for_the_client_workloads(k8s: Any, run_operator: Any, shared: Any) -> None:
    """On the shared Redis the client password rides on the organism's rotation; once the organism's pods
    rolled, the old client password still waits for the client workloads."""
    op = await run_operator()
    await rot.ready_shared_organism(k8s, "cli")
    await eventually(lambda: ((get_obj(k8s, ORGANISMS, "cli") or {}).get("status") or {}).get("binding"))
    await client_deployment(k8s, "web", "cli")
    user, old = "xpc-default.cli", secret(k8s, "cli-binding")["password"]
    await rot.request_rotation(k8s, "cli", "r1")
    new = await eventually(lambda: (p := secret(k8s, "cli-binding")["password"]) != old and p)
    for dep in ("cli-pump", "cli-worker"):
        await eventually(lambda: rot.rotation_status(k8s, "cli").get("phase") == "RollingOut")
        await rot.mark_rolled(k8s, dep)
    await eventually(lambda: rot.rotation_status(k8s, "cli").get("phase") == "Idle")  # the organism's is done
    cond = await eventually(lambda: client_condition(k8s, "cli"))
    assert cond["reason"] == "WaitingForClients" and "Deployment/web" in cond["message"]
    assert rot.can_login(shared, user, old) and rot.can_login(shared, user, new)
    assert "password-previous-sha256" in secret(k8s, "cli-binding")
    await rollout_restart(k8s, "web")
    await run_pass(op, "cli")
    assert not rot.can_login(shared, user, old) and rot.can_login(shared, user, new)
    assert "password-previous-sha256" not in secret(k8s, "cli-binding") and client_condition(k8s, "cli") is None
