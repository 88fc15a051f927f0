"""The operator provisions an organism's client identity on the shared Redis: a binding Secret in the
Service Binding layout, status.binding naming it, and a client ACL user that can send, read answers and
read the context -- and is deleted with the Organism."""
from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import redis
from redis_server import RedisServer

from xml_pipeline.client import OrganismClient
from xml_pipeline.memory import BackendConfig
from xml_pipeline.memory.context_buffer import ContextBuffer
from xml_pipeline_operator.redis_admin import Tenant
from xml_pipeline_operator.tenancy import acl, client_acl

from . import test_operator_shared as base

# Fixtures and helpers of the shared-mode operator tests (the kmock harness and a real shared Redis).
k8s, kubeconfig, start_operator = base.k8s, base.kubeconfig, base.start_operator
shared, admin_client, run_operator = base.shared, base.admin_client, base.run_operator
create, get_obj, harness, pod_backend, quiet = base.create, base.get_obj, base.harness, base.pod_backend, base.quiet
shared_spec, eventually, ORGANISMS = base.shared_spec, base.eventually, base.ORGANISMS


def binding(k8s: Any, name: str, namespace: str = "default") -> dict[str, Any] | None:
    return get_obj(k8s, "v1/secrets", f"{name}-binding", namespace)


def bound(k8s: Any, name: str) -> dict[str, Any] | None:
    obj = get_obj(k8s, ORGANISMS, name)
    return obj if obj and (obj.get("status") or {}).get("binding") else None


def mount(secret: dict[str, Any], root: Path) -> Path:
    """The Secret as kubelet mounts it: one file per key."""
    d = root / "organism"
    d.mkdir(parents=True)
    for k, v in secret["data"].items():
        (d / k).write_bytes(base64.b64decode(v))
    return d


async def test_binding_secret_status_and_client_user(k8s: Any, run_operator: Any, shared: RedisServer,
                                                    admin_client: redis.Redis, tmp_path: Path) -> None:
    await run_operator()
    await create(k8s, "shop", shared_spec())
    org = await eventually(lambda: bound(k8s, "shop"))
    assert org["status"]["binding"] == {"name": "shop-binding"}
    secret = binding(k8s, "shop")
    assert secret is not None and secret["type"] == "servicebinding.io/redis"
    values = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    creds = {k: base64.b64decode(v).decode() for k, v in get_obj(k8s, "v1/secrets", "shop-credentials")["data"].items()}
    assert values["type"] == "redis" and values["provider"] == "xml-pipeline"
    assert values["url"] == shared.url and "@" not in values["url"]
    assert (values["host"], values["port"]) == ("127.0.0.1", str(shared.port))
    assert values["prefix"] == "xp:default.shop:" and values["ttl"] == "600" and values["tls"] == "false"
    assert values["username"] == "xpc-default.shop" != creds["redis-username"]
    assert values["password"] != creds["redis-password"]
    assert values["signing-key"] == creds["signing-key"]
    user = acl.get_user(admin_client, "xpc-default.shop")
    assert user is not None and user.key_patterns == set(client_acl.key_patterns("xp:default.shop:"))

    # The pods write a thread; a client configured from the mounted binding reads it and may not write.
    with pod_backend(shared, k8s, "shop") as b:
        ContextBuffer(b).append("t-1", "<order/>", "shop", "console")
    config = BackendConfig.from_binding(mount(secret, tmp_path))
    with OrganismClient(config) as client:
        assert [s.payload for s in client.read_thread("t-1")] == ["<order/>"]
        raw = redis.Redis.from_url(values["url"], username=values["username"], password=values["password"])
        try:
            raw.rpush("xp:default.shop:buffer:{t-1}", b"forged")
        except redis.exceptions.NoPermissionError:
            pass
        else:
            raise AssertionError("the client user could write the context buffer")
        raw.close()

    # Idle passes write nothing (no Secret patch, no ACL SETUSER).
    await quiet(k8s)
    calls = admin_client.info("commandstats").get("cmdstat_acl|setuser", {}).get("calls", 0)
    start = len(k8s.history)
    await quiet(k8s)
    assert admin_client.info("commandstats").get("cmdstat_acl|setuser", {}).get("calls", 0) == calls
    assert not harness.writes(k8s, start)



async def test_lost_client_user_comes_back_on_the_next_pass(k8s: Any, run_operator: Any, shared: RedisServer,
                                                           admin_client: redis.Redis) -> None:
    op = await run_operator()
    await create(k8s, "svc", shared_spec())
    await eventually(lambda: bound(k8s, "svc"))
    admin_client.execute_command("ACL", "DELUSER", "xpc-default.svc")
    # A pass runs in a thread: kmock is served by this test's event loop.
    await asyncio.get_running_loop().run_in_executor(None, op.reconciler.reconcile, "default", "svc")
    assert acl.user_exists(admin_client, "xpc-default.svc")
    # Releasing the organism (its finalizer, whatever the deletion policy) deletes its client user.
    uid = get_obj(k8s, ORGANISMS, "svc")["metadata"]["uid"]
    tenant = Tenant("default", "svc", "xp:default.svc:", username="xp-default.svc", uid=uid)
    await asyncio.get_running_loop().run_in_executor(None, op.reconciler.admin.release_tenant, tenant, "Retain")
    assert not acl.user_exists(admin_client, "xpc-default.svc")


async def test_deleting_the_password_key_replaces_the_client_password(k8s: Any, run_operator: Any,
                                                                      shared: RedisServer) -> None:
    """docs/clients.md: the way to replace a client password; the old one stops working."""
    op = await run_operator()
    await create(k8s, "pay", shared_spec())
    await eventually(lambda: bound(k8s, "pay"))
    old = base64.b64decode(binding(k8s, "pay")["data"]["password"]).decode()
    resp = await k8s.patch("/api/v1/namespaces/default/secrets/pay-binding", json={"data": {"password": None}},
                           headers={"Content-Type": "application/merge-patch+json"})
    assert resp.status == 200, await resp.text()
    await asyncio.get_running_loop().run_in_executor(None, op.reconciler.reconcile, "default", "pay")
    new = base64.b64decode(binding(k8s, "pay")["data"]["password"]).decode()
    assert new and new != old
    ok = redis.Redis.from_url(shared.url, username="xpc-default.pay", password=new)
    assert ok.ping()
    ok.close()
    try:
        redis.Redis.from_url(shared.url, username="xpc-default.pay", password=old).ping()
    except redis.AuthenticationError:
        pass
    else:
        raise AssertionError("the old client password still works")


async def test_client_password_rotates_with_the_organisms(k8s: Any, run_operator: Any, shared: RedisServer,
                                                          admin_client: redis.Redis) -> None:
    """xml-pipeline.dev/rotate-credentials rotates the client password too: Redis accepts the new one
    before the binding hands it out, keeps the old one while the organism's pods roll, then retires it."""
    from . import test_rotation as rot
    await run_operator()
    await rot.ready_shared_organism(k8s, "cli")
    await eventually(lambda: bound(k8s, "cli"))
    user = "xpc-default.cli"
    old = base64.b64decode(binding(k8s, "cli")["data"]["password"]).decode()
    await rot.request_rotation(k8s, "cli", "r1")
    new = await eventually(lambda: (p := base64.b64decode(binding(k8s, "cli")["data"]["password"]).decode()) != old
                           and p)
    assert rot.can_login(shared, user, new) and rot.can_login(shared, user, old)
    assert "password-next" not in binding(k8s, "cli")["data"]
    for dep in ("cli-pump", "cli-worker"):
        await eventually(lambda d=dep: rot.rotation_status(k8s, "cli").get("phase") == "RollingOut")
        await rot.mark_rolled(k8s, dep)
    await eventually(lambda: "password-previous-sha256" not in binding(k8s, "cli")["data"])
    assert not rot.can_login(shared, user, old) and rot.can_login(shared, user, new)
    assert acl.get_user(admin_client, user).password_hashes == {acl.password_hash(new)}
    await quiet(k8s)  # one rotation per request
    assert base64.b64decode(binding(k8s, "cli")["data"]["password"]).decode() == new


def test_client_rotation_steps() -> None:
    from xml_pipeline_operator.desired import binding as b
    base = {"password": "old"}
    assert b.client_rotation_step("Idle", None, base) is None
    assert b.client_rotation_step("Accepting", "r1", base) == "generate"
    assert b.client_rotation_step("RollingOut", "r1", base | {"rotated-for": "r1"}) is None  # once per request
    assert b.client_rotation_step("RollingOut", "r1", base | {"password-next": "new"}) == "publish"
    assert b.client_rotation_step("Idle", "r1", base | {"password-previous-sha256": "ab" * 32}) == "retire"
    patch = b.client_publish_patch(base | {"password-next": "new"}, "r1", "2026-01-01T00:00:00Z")
    assert patch == {"password": "new", "password-next": None, "rotated-for": "r1",
                     "password-previous-sha256": acl.password_hash("old"), "rotated-at": "2026-01-01T00:00:00Z"}
    assert b.accepted_besides_password(base | {"password-next": "new"}) == {acl.password_hash("new")}
