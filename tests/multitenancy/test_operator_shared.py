"""Shared mode end to end: the real kopf operator (tests/operator's kmock harness) + a real shared
redis-server. ACL user and Secret per Organism, overlap refused naming the first Organism, deletion
(Delete removes every key and the user, Retain keeps the keys), usage in status, lost users
re-created after a Redis restart."""
from __future__ import annotations

import base64
import dataclasses
import importlib.util
import secrets
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis_server import RedisServer

from xml_pipeline.memory import BackendConfig
from xml_pipeline.memory.redis_backend import RedisBackend
from xml_pipeline_operator.model import SpecError, parse_organism
from xml_pipeline_operator.tenancy import acl, ownership
from xml_pipeline_operator.tenancy.admin import SharedRedisAdmin

from .conftest import ADMIN_PASSWORD

# -- the operator area's kmock harness, reused as is --------------------------------------------------
_OPERATOR_TESTS = Path(__file__).resolve().parents[1] / "operator"
if not (_OPERATOR_TESTS / "conftest.py").exists():  # pragma: no cover
    pytest.skip("tests/operator's harness is missing", allow_module_level=True)
if str(_OPERATOR_TESTS) not in sys.path:  # its conftest imports kmock_cluster; appended, so it shadows nothing
    sys.path.append(str(_OPERATOR_TESTS))
_spec = importlib.util.spec_from_file_location("xp_operator_harness", _OPERATOR_TESTS / "conftest.py")
assert _spec is not None and _spec.loader is not None
harness = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = harness  # dataclasses look their module up while the class is built
_spec.loader.exec_module(harness)
# Fixtures, under their own names so pytest finds them in this module.
k8s = harness.k8s
kubeconfig = harness.kubeconfig
start_operator = harness.start_operator
eventually, quiet, get_obj, condition = harness.eventually, harness.quiet, harness.get_obj, harness.condition
ORGANISMS, DEPLOYMENTS = harness.ORGANISMS, harness.DEPLOYMENTS

LISTENERS = [{"name": "greeter", "handler": "xml_pipeline.examples.greeter:handle"}]
MERGE = {"Content-Type": "application/merge-patch+json"}


# -- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture
def shared() -> Iterator[RedisServer]:
    """A private shared Redis (admin = default user with a password), so users and keys are countable."""
    server = RedisServer(password=ADMIN_PASSWORD).start()
    yield server
    server.cleanup()


@pytest.fixture
def admin_client(shared: RedisServer) -> Iterator[redis.Redis]:
    c = shared.client()
    yield c
    c.close()


@pytest.fixture
def run_operator(start_operator: Any, shared: RedisServer) -> Callable[..., Any]:
    async def run(**admin_kw: Any) -> Any:
        settings = dataclasses.replace(harness.TEST_SETTINGS, shared_redis_url=shared.url,
                                       shared_redis_password=ADMIN_PASSWORD)
        kw = {"usage_interval": 0.2, "user_check_interval": 0.2, **admin_kw}
        op = await start_operator(settings, admin=SharedRedisAdmin(settings, **kw))
        return op
    return run


# -- helpers -----------------------------------------------------------------------------------------
def shared_spec(prefix: str | None = None, **redis_fields: Any) -> dict[str, Any]:
    r: dict[str, Any] = {"mode": "shared", "ttl": 600, **redis_fields}
    if prefix is not None:
        r["prefix"] = prefix
    return {"config": {"listeners": LISTENERS}, "backend": {"redis": r}}


async def create(k8s: Any, name: str, spec: dict[str, Any], namespace: str = "default") -> None:
    resp = await k8s.post(harness.org_path(namespace=namespace), json=harness.organism(name, spec, namespace))
    assert resp.status == 201, await resp.text()


async def delete(k8s: Any, name: str, namespace: str = "default") -> None:
    resp = await k8s.delete(harness.org_path(name, namespace))
    assert resp.status == 200, await resp.text()
    await eventually(lambda: get_obj(k8s, ORGANISMS, name, namespace) is None)


def credentials(k8s: Any, name: str, namespace: str = "default") -> dict[str, str]:
    obj = get_obj(k8s, "v1/secrets", f"{name}-credentials", namespace)
    assert obj is not None
    return {k: base64.b64decode(v).decode() for k, v in obj["data"].items()}


def redis_ready(k8s: Any, name: str, status: str = "True", namespace: str = "default") -> dict[str, Any] | None:
    obj = get_obj(k8s, ORGANISMS, name, namespace)
    c = condition(obj, "RedisReady")
    return obj if c and c["status"] == status else None


def pod_backend(server: RedisServer, k8s: Any, name: str, namespace: str = "default") -> RedisBackend:
    """A backend exactly as the organism's pods build it: URL from the Deployment, the rest from the Secret."""
    creds = credentials(k8s, name, namespace)
    pump = get_obj(k8s, DEPLOYMENTS, f"{name}-pump", namespace)
    assert pump is not None
    env = {e["name"]: e for e in pump["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["XP_REDIS_URL"]["value"] == server.url  # no credentials in the URL
    for var, key in (("XP_REDIS_USERNAME", "redis-username"), ("XP_REDIS_PASSWORD", "redis-password"),
                     ("XP_SIGNING_KEY", "signing-key")):
        ref = env[var]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": f"{name}-credentials", "key": key}, (var, ref)
    return RedisBackend(BackendConfig(
        backend_type="redis", redis_url=env["XP_REDIS_URL"]["value"], redis_prefix=env["XP_REDIS_PREFIX"]["value"],
        redis_ttl=600, redis_username=creds["redis-username"], redis_password=creds["redis-password"],
        signing_key=creds["signing-key"], retries=1))


def keys_under(admin: redis.Redis, prefix: str) -> list[bytes]:
    return list(admin.scan_iter(match=f"{prefix}*", count=1000))


# -- tests -------------------------------------------------------------------------------------------
async def test_shared_organism_gets_a_confined_user(k8s: Any, run_operator: Any, shared: RedisServer,
                                                    admin_client: redis.Redis) -> None:
    await run_operator()
    await create(k8s, "bus", shared_spec())
    org = await eventually(lambda: redis_ready(k8s, "bus"))
    assert condition(org, "RedisReady")["reason"] == "AclUserReady"
    creds = credentials(k8s, "bus")
    assert creds["redis-username"] == "xp-default.bus"
    user = acl.get_user(admin_client, "xp-default.bus")
    assert user is not None and user.enabled and user.key_patterns == {"~xp:default.bus:*"}
    assert user.password_hashes == {acl.password_hash(creds["redis-password"])}
    with pod_backend(shared, k8s, "bus") as b:
        assert b.buffer_append("t-1", b"x") == 0
        with pytest.raises(Exception, match="(?i)no permissions"):
            b.client.get("xp:default.other:chain:x")
    # Re-applying changes nothing: an idle operator writes nothing to Redis's ACLs.
    calls = admin_client.info("commandstats").get("cmdstat_acl|setuser", {}).get("calls", 0)
    await quiet(k8s)
    assert admin_client.info("commandstats").get("cmdstat_acl|setuser", {}).get("calls", 0) == calls


async def test_overlapping_prefix_refused_naming_the_first(k8s: Any, run_operator: Any,
                                                           admin_client: redis.Redis) -> None:
    op = await run_operator()
    await create(k8s, "shop", shared_spec("shop:"))
    await eventually(lambda: redis_ready(k8s, "shop"))
    await create(k8s, "shop-eu", shared_spec("shop:eu:"), namespace="team-b")
    org = await eventually(lambda: redis_ready(k8s, "shop-eu", "False", "team-b"))
    for ctype in ("RedisReady", "Ready"):
        c = condition(org, ctype)
        assert c["reason"] == "PrefixOverlap" and "default/shop" in c["message"], c
    assert not acl.user_exists(admin_client, "xp-team-b.shop-eu")
    # The verdict survives an operator restart (the index knows both before any handler runs).
    await op.stop()
    await run_operator()
    await quiet(k8s)
    assert redis_ready(k8s, "shop") and redis_ready(k8s, "shop-eu", "False", "team-b")
    assert not acl.user_exists(admin_client, "xp-team-b.shop-eu")


async def test_delete_removes_keys_and_user_and_nothing_else(k8s: Any, run_operator: Any, shared: RedisServer,
                                                             admin_client: redis.Redis,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    # A tiny budget per finalizer call: the cleanup is interrupted and resumed from its recorded cursor.
    await run_operator(cleanup_budget=0, cleanup_batch=1000)  # one batch per finalizer call
    for name in ("gone", "kept"):
        await create(k8s, name, shared_spec())
    for name in ("gone", "kept"):
        await eventually(lambda n=name: redis_ready(k8s, n))
        with pod_backend(shared, k8s, name) as b:
            for i in range(300):
                b.buffer_append(f"t-{i}", b"slot")
                b.registry_set(f"console.l{i}", f"t-{i}")
    kept_before = sorted(keys_under(admin_client, "xp:default.kept:"))
    # buffer, op, uuid, chain per thread, and the prefix's index
    assert len(keys_under(admin_client, "xp:default.gone:")) == 1201
    await delete(k8s, "gone")
    assert "continuing" in caplog.text  # it really took more than one finalizer call
    assert keys_under(admin_client, "xp:default.gone:") == []
    assert not acl.user_exists(admin_client, "xp-default.gone")
    assert not list(admin_client.scan_iter(match="{xp-operator}:cleanup:*"))  # no progress record left behind
    # The prefix is free again (its data is gone); the kept one's ownership record stays.
    assert ownership.owner_of(admin_client, "xp:default.gone:") is None
    assert ownership.owner_of(admin_client, "xp:default.kept:") == ownership.Owner(
        "default", "kept", get_obj(k8s, ORGANISMS, "kept")["metadata"]["uid"])
    assert sorted(keys_under(admin_client, "xp:default.kept:")) == kept_before
    assert acl.user_exists(admin_client, "xp-default.kept")
    with pod_backend(shared, k8s, "kept") as b:
        assert b.buffer_thread_len("t-7") == 1


async def test_retain_keeps_keys_and_disables_user(k8s: Any, run_operator: Any, shared: RedisServer,
                                                   admin_client: redis.Redis) -> None:
    await run_operator()
    await create(k8s, "archive", shared_spec(deletionPolicy="Retain"))
    await eventually(lambda: redis_ready(k8s, "archive"))
    b = pod_backend(shared, k8s, "archive")
    b.buffer_append("t-1", b"keep me")
    await delete(k8s, "archive")
    assert admin_client.lrange("xp:default.archive:buffer:{t-1}", 0, -1) == [b"keep me"]
    user = acl.get_user(admin_client, "xp-default.archive")
    assert user is not None and not user.enabled
    assert not b.ping()  # its connection was closed and it cannot log in again
    b.close()


async def test_refused_organism_deletion_leaves_the_owner_alone(k8s: Any, run_operator: Any,
                                                                shared: RedisServer,
                                                                admin_client: redis.Redis) -> None:
    await run_operator()
    await create(k8s, "owner", shared_spec("same:"))
    await eventually(lambda: redis_ready(k8s, "owner"))
    await create(k8s, "twin", shared_spec("same:"))
    await eventually(lambda: redis_ready(k8s, "twin", "False"))
    with pod_backend(shared, k8s, "owner") as b:
        b.buffer_append("t-1", b"owner's")
    await delete(k8s, "twin")
    assert admin_client.lrange("same:buffer:{t-1}", 0, -1) == [b"owner's"]
    assert acl.user_exists(admin_client, "xp-default.owner")


async def test_usage_reaches_the_status(k8s: Any, run_operator: Any, shared: RedisServer) -> None:
    await run_operator()
    await create(k8s, "busy", shared_spec())
    await eventually(lambda: redis_ready(k8s, "busy"))
    with pod_backend(shared, k8s, "busy") as b:
        for i in range(12):
            b.buffer_append(f"t-{i}", b"x" * 100)
    org = await eventually(lambda: (o := get_obj(k8s, ORGANISMS, "busy")) and
                           ((o.get("status") or {}).get("usage") or {}).get("threads") == 12 and o)
    usage = org["status"]["usage"]
    assert usage["keys"] == 25 and usage["approxBytes"] > 0  # buffer + op per thread, the index and usage["measuredAt"].endswith("Z")


async def test_lost_users_are_recreated_and_pods_recover(k8s: Any, run_operator: Any, shared: RedisServer,
                                                         admin_client: redis.Redis) -> None:
    await run_operator()
    await create(k8s, "phoenix", shared_spec())
    await eventually(lambda: redis_ready(k8s, "phoenix"))
    b = pod_backend(shared, k8s, "phoenix")
    assert b.buffer_append("t-1", b"before") == 0
    shared.restart()  # no ACL file: the user is gone
    # The operator's periodic check notices and re-creates the user; the same backend object
    # (a running pod) reconnects and logs in again by itself.
    await eventually(lambda: acl.user_exists(admin_client, "xp-default.phoenix"))
    assert await eventually(lambda: b.ping())
    assert b.buffer_append("t-1", b"after") == 0
    b.close()


def test_deletion_policy_is_validated() -> None:
    body = harness.organism("x", shared_spec(deletionPolicy="Keep"))
    with pytest.raises(SpecError) as err:
        parse_organism(body, harness.TEST_SETTINGS)
    assert err.value.field == "spec.backend.redis.deletionPolicy" and "Retain" in str(err.value)
    ok = parse_organism(harness.organism("x", shared_spec(deletionPolicy="Retain")), harness.TEST_SETTINGS)
    assert ok.redis is not None and ok.redis.deletion_policy == "Retain"


def test_unreachable_shared_redis_is_a_condition_not_a_crash() -> None:
    from xml_pipeline_operator.redis_admin import Tenant

    settings = dataclasses.replace(harness.TEST_SETTINGS, shared_redis_url="redis://127.0.0.1:1/0",
                                   shared_redis_password=secrets.token_hex(8))
    admin = SharedRedisAdmin(settings)
    state = admin.ensure_tenant(Tenant("default", "x", "xp:default.x:", username="xp-default.x"), "pw")
    assert not state.ready and state.reason == "SharedRedisUnavailable"
    assert "redis://127.0.0.1:1/0" in state.message and settings.shared_redis_password not in state.message


async def test_leaving_shared_mode_disables_the_user(k8s: Any, run_operator: Any, shared: RedisServer,
                                                     admin_client: redis.Redis) -> None:
    await run_operator()
    await create(k8s, "mover", shared_spec())
    await eventually(lambda: redis_ready(k8s, "mover"))
    resp = await k8s.patch(harness.org_path("mover"), json={"spec": {"backend": {"redis": {"mode": "dedicated"}}}},
                           headers=MERGE)
    assert resp.status == 200, await resp.text()
    await eventually(lambda: (u := acl.get_user(admin_client, "xp-default.mover")) is not None and not u.enabled)
    # Back to shared: the same user works again.
    resp = await k8s.patch(harness.org_path("mover"), json={"spec": {"backend": {"redis": {"mode": "shared"}}}},
                           headers=MERGE)
    assert resp.status == 200
    await eventually(lambda: (u := acl.get_user(admin_client, "xp-default.mover")) is not None and u.enabled)


async def test_switch_while_operator_was_down_is_caught(k8s: Any, run_operator: Any, shared: RedisServer,
                                                        admin_client: redis.Redis) -> None:
    op = await run_operator()
    for name in ("stay", "mover"):
        await create(k8s, name, shared_spec())
    await eventually(lambda: redis_ready(k8s, "stay") and redis_ready(k8s, "mover"))
    await op.stop()
    resp = await k8s.patch(harness.org_path("mover"), json={"spec": {"backend": {"redis": {"mode": "dedicated"}}}},
                           headers=MERGE)
    assert resp.status == 200
    await run_operator()  # "stay" keeps a shared timer running, which drives the periodic check
    await eventually(lambda: (u := acl.get_user(admin_client, "xp-default.mover")) is not None and not u.enabled)
    assert acl.get_user(admin_client, "xp-default.stay").enabled  # type: ignore[union-attr]
