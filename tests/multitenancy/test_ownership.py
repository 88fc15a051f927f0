"""A prefix on the shared Redis is owned: no Organism can squat another's prefix (also after it was
deleted with its data retained), block later ones with a broad prefix, or nest inside another's.
Pure rules, the records on a real redis-server, the admin, the CRD's CEL rule, and the kopf operator
on kmock with a real shared Redis."""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import redis
import yaml
from redis_server import RedisServer

from xml_pipeline_operator import model
from xml_pipeline_operator.redis_admin import Tenant
from xml_pipeline_operator.settings import OperatorSettings
from xml_pipeline_operator.tenancy import acl, ownership
from xml_pipeline_operator.tenancy.admin import SharedRedisAdmin

from .conftest import ADMIN_PASSWORD, Org
from . import test_operator_shared as so
from .test_operator_shared import ORGANISMS, condition, create, delete, eventually, get_obj, pod_backend, redis_ready, shared_spec

# The shared-mode operator fixtures, under their own names so pytest finds them in this module.
k8s, kubeconfig, start_operator = so.k8s, so.kubeconfig, so.start_operator
shared, admin_client, run_operator = so.shared, so.admin_client, so.run_operator

Owner = ownership.Owner


# -- the rules, pure ---------------------------------------------------------------------------------
def test_find_refusal_rules() -> None:
    a = Owner("team-a", "shop", "uid-1")
    recorded = {"shop:eu:": a}
    # The owner itself, also re-created under the same name with a new uid, may claim it.
    assert ownership.find_refusal("shop:eu:", Owner("team-a", "shop", "uid-2"), recorded) is None
    other = Owner("team-b", "shop", "uid-3")
    same = ownership.find_refusal("shop:eu:", other, recorded)
    assert same is not None and same.reason == "PrefixOwned" and same.owner == a
    assert same.message.startswith("spec.backend.redis.prefix:") and "team-a/shop" in same.message
    broad = ownership.find_refusal("shop:", other, recorded)
    assert broad is not None and broad.reason == "PrefixOverlap" and "would contain" in broad.message
    nested = ownership.find_refusal("shop:eu:x:", other, recorded)
    assert nested is not None and nested.reason == "PrefixOverlap" and "lies inside" in nested.message
    assert ownership.find_refusal("shop:us:", other, recorded) is None
    assert ownership.find_refusal("sho:", other, recorded) is None  # a prefix by segments, not characters


def test_the_default_prefix_space_is_reserved_in_shared_mode() -> None:
    r = model.reserved_prefix_problem
    assert r("xp:team-a.orders:", "team-a", "orders") is None           # its own default
    assert r("xp:team-a.orders:eu:", "team-a", "orders") is None        # under its own default
    assert r("shop:", "team-b", "x") is None
    squat = r("xp:team-a.orders:", "team-b", "orders")
    assert squat is not None and "team-a/orders" in squat
    assert r("xp:team-a.orders:eu:", "team-b", "x") is not None
    broad = r("xp:", "team-b", "x")
    assert broad is not None and "contain" in broad
    assert r("xp:shop:", "team-b", "x") is not None

    settings = OperatorSettings(shared_redis_url="redis://shared:6379")

    def parse(mode: str, prefix: str, namespace: str = "team-b") -> model.Organism:
        body = {"apiVersion": "xml-pipeline.dev/v1alpha1", "kind": "Organism",
                "metadata": {"name": "x", "namespace": namespace, "uid": "u"},
                "spec": {"config": {"listeners": [{"name": "g", "handler": "xml_pipeline.examples.greeter:handle"}]},
                         "backend": {"redis": {"mode": mode, "prefix": prefix}}}}
        return model.parse_organism(body, settings)

    with pytest.raises(model.SpecError) as err:
        parse("shared", "xp:team-a.orders:")
    assert err.value.field == "spec.backend.redis.prefix" and "team-a/orders" in str(err.value)
    with pytest.raises(model.SpecError):
        parse("shared", "xp:")
    assert parse("shared", "shop:").redis is not None
    assert parse("dedicated", "xp:orders:").redis is not None  # a Redis of its own: no one to squat


def test_crd_refuses_what_it_can_see() -> None:
    """CEL cannot see the namespace, so it refuses what is wrong for every Organism (`xp:`, `xp:shop:`);
    `xp:<other-namespace>.<name>:` is left to the operator."""
    from crd_schema import load_crd, validate  # tests/operator, on the path through test_operator_shared
    from operator_harness import CRD_PATH, EXAMPLES

    crd = load_crd(CRD_PATH)
    good = yaml.safe_load((EXAMPLES / "organism-shared.yaml").read_text())

    def errors(mode: str, prefix: str) -> list[str]:
        obj = copy.deepcopy(good)
        obj["spec"]["backend"]["redis"].update(mode=mode, prefix=prefix)
        return [e.message for e in validate(obj, crd)]

    for bad in ("xp:", "xp:shop:", "xp:shop:eu:"):
        msgs = errors("shared", bad)
        assert any(m.startswith("spec.backend.redis.prefix: on a shared Redis the space 'xp:'") for m in msgs), msgs
    assert errors("shared", "xp:team-a.orders:") == []
    assert errors("shared", "team-a.bus:") == []
    assert errors("dedicated", "xp:shop:") == []


# -- the records on a real redis-server --------------------------------------------------------------
def test_claim_release_retain_on_redis(admin: redis.Redis) -> None:
    prefix = "own-test:a:"
    a, b = Owner("team-a", "a", "uid-1"), Owner("team-b", "b", "uid-9")
    try:
        assert ownership.claim(admin, prefix, a) is None
        assert ownership.claim(admin, prefix, a) is None  # idempotent
        assert ownership.owner_of(admin, prefix) == a
        refused = ownership.claim(admin, prefix, b)
        assert refused is not None and refused.owner == a
        assert ownership.mark_retained(admin, prefix, a)
        refused = ownership.claim(admin, prefix, b)
        assert refused is not None and "Retain" in refused.message and "uid-1" in refused.message
        assert not ownership.release(admin, prefix, b)  # not b's to release
        # Re-created under the same name (a new uid): it takes its data back.
        a2 = Owner("team-a", "a", "uid-2")
        assert ownership.claim(admin, prefix, a2) is None and ownership.owner_of(admin, prefix) == a2
        assert ownership.release(admin, prefix, a2) and ownership.owner_of(admin, prefix) is None
        assert ownership.claim(admin, prefix, b) is None
    finally:
        admin.hdel(ownership.OWNERS_KEY, prefix)


def test_tenants_cannot_read_the_records(make_org: Callable[..., Org], admin: redis.Redis) -> None:
    ownership.claim(admin, "own-test:r:", Owner("ns", "r"))
    org = make_org("reader")
    with org.client() as r:
        for call in (lambda: r.hgetall(ownership.OWNERS_KEY),
                     lambda: r.hset(ownership.OWNERS_KEY, org.prefix, "{}"),
                     lambda: r.delete(ownership.OWNERS_KEY)):
            with pytest.raises(redis.exceptions.NoPermissionError):
                call()
    admin.hdel(ownership.OWNERS_KEY, "own-test:r:")


# -- the admin ---------------------------------------------------------------------------------------
@pytest.fixture
def shared_admin(shared: RedisServer) -> SharedRedisAdmin:
    settings = OperatorSettings(shared_redis_url=shared.url, shared_redis_password=ADMIN_PASSWORD)
    return SharedRedisAdmin(settings)


def tenant(ns: str, name: str, prefix: str, uid: str) -> Tenant:
    return Tenant(namespace=ns, name=name, prefix=prefix, username=acl.username_for(ns, name), uid=uid)


def test_squatting_a_retained_prefix_is_refused_and_the_owner_reclaims_it(
        shared_admin: SharedRedisAdmin, admin_client: redis.Redis, shared: RedisServer) -> None:
    owner = tenant("team-a", "orders", "orders:", "uid-1")
    assert shared_admin.ensure_tenant(owner, "pw-a").ready
    admin_client.rpush("orders:buffer:{t-1}", b"a's data")
    squatter = tenant("team-b", "orders", "orders:", "uid-2")
    # Order 1: while the owner exists.
    state = shared_admin.ensure_tenant(squatter, "pw-b")
    assert not state.ready and state.reason == "PrefixOwned"
    assert "spec.backend.redis.prefix" in state.message and "team-a/orders" in state.message
    assert not acl.user_exists(admin_client, squatter.username)
    # Order 2: after it was deleted with its data retained.
    shared_admin.release_tenant(owner, "Retain")
    state = shared_admin.ensure_tenant(squatter, "pw-b")
    assert not state.ready and state.reason == "PrefixOwned" and "Retain" in state.message
    shared_admin.release_tenant(squatter)  # the squatter's deletion touches nothing of the owner's
    assert admin_client.lrange("orders:buffer:{t-1}", 0, -1) == [b"a's data"]
    # The owner, re-created (new uid), gets its data back.
    again = dataclasses.replace(owner, uid="uid-3")
    assert shared_admin.ensure_tenant(again, "pw-a2").ready
    with redis.Redis.from_url(shared.url, username=again.username, password="pw-a2") as r:
        assert r.lrange("orders:buffer:{t-1}", 0, -1) == [b"a's data"]
    # Delete: the keys go and the prefix is free for anyone.
    shared_admin.release_tenant(again, "Delete")
    assert ownership.owner_of(admin_client, "orders:") is None
    assert shared_admin.ensure_tenant(squatter, "pw-b").ready


def test_broad_and_nested_prefixes_are_refused(shared_admin: SharedRedisAdmin) -> None:
    assert shared_admin.ensure_tenant(tenant("a", "eu", "shop:eu:", "u1"), "pw").ready
    broad = shared_admin.ensure_tenant(tenant("b", "all", "shop:", "u2"), "pw")
    assert broad.reason == "PrefixOverlap" and "would contain" in broad.message and "a/eu" in broad.message
    nested = shared_admin.ensure_tenant(tenant("c", "de", "shop:eu:de:", "u3"), "pw")
    assert nested.reason == "PrefixOverlap" and "lies inside" in nested.message
    reserved = shared_admin.ensure_tenant(tenant("c", "all", "xp:", "u4"), "pw")
    assert reserved.reason == "PrefixReserved" and "spec.backend.redis.prefix" in reserved.message
    assert shared_admin.ensure_tenant(tenant("d", "us", "shop:us:", "u5"), "pw").ready


# -- the operator ------------------------------------------------------------------------------------
async def test_operator_refuses_a_squatter_of_retained_data(k8s: Any, run_operator: Any, shared: RedisServer,
                                                            admin_client: redis.Redis) -> None:
    await run_operator()
    await create(k8s, "orders", shared_spec("orders:", deletionPolicy="Retain"), namespace="team-a")
    await eventually(lambda: redis_ready(k8s, "orders", namespace="team-a"))
    with pod_backend(shared, k8s, "orders", "team-a") as b:
        b.buffer_append("t-1", b"a's data")
    await delete(k8s, "orders", "team-a")
    await create(k8s, "thief", shared_spec("orders:"), namespace="team-b")
    org = await eventually(lambda: redis_ready(k8s, "thief", "False", "team-b"))
    for ctype in ("RedisReady", "Ready"):
        c = condition(org, ctype)
        assert c is not None and c["reason"] == "PrefixOwned", c
        assert "spec.backend.redis.prefix" in c["message"] and "team-a/orders" in c["message"], c
    user = acl.get_user(admin_client, "xp-team-b.thief")
    assert user is None or not user.enabled
    # The owner comes back under its name and finds its data; the squatter stays refused.
    await delete(k8s, "thief", "team-b")
    # The garbage collector's part (kmock has none): the deleted Organism's Secret goes with it.
    resp = await k8s.delete("/api/v1/namespaces/team-a/secrets/orders-credentials")
    assert resp.status == 200, await resp.text()
    await create(k8s, "orders", shared_spec("orders:", deletionPolicy="Retain"), namespace="team-a")
    await eventually(lambda: redis_ready(k8s, "orders", namespace="team-a"))
    with pod_backend(shared, k8s, "orders", "team-a") as b:
        assert b.buffer_get_thread("t-1")  # the retained slot, readable with the new credentials
    uid = get_obj(k8s, ORGANISMS, "orders", "team-a")["metadata"]["uid"]  # type: ignore[index]
    assert ownership.owner_of(admin_client, "orders:") == Owner("team-a", "orders", uid)


async def test_operator_a_broad_prefix_blocks_nobody(k8s: Any, run_operator: Any,
                                                     admin_client: redis.Redis) -> None:
    """`xp:` first: refused (it would contain every default prefix), and a later default-prefix
    Organism is admitted. A default prefix taken by another namespace: refused naming its owner."""
    await run_operator()
    await create(k8s, "everything", shared_spec("xp:"), namespace="team-b")
    org = await eventually(lambda: (o := get_obj(k8s, ORGANISMS, "everything", "team-b"))
                           and condition(o, "Ready") and o)
    c = condition(org, "Ready")
    assert c is not None and c["status"] == "False" and c["message"].startswith("spec.backend.redis.prefix"), c
    await create(k8s, "orders", shared_spec(), namespace="team-a")
    await eventually(lambda: redis_ready(k8s, "orders", namespace="team-a"))
    await create(k8s, "copycat", shared_spec("xp:team-a.orders:"), namespace="team-b")
    org = await eventually(lambda: (o := get_obj(k8s, ORGANISMS, "copycat", "team-b"))
                           and condition(o, "Ready") and o)
    c = condition(org, "Ready")
    assert c is not None and c["status"] == "False" and "team-a/orders" in c["message"], c
    assert not acl.user_exists(admin_client, "xp-team-b.copycat")
    assert not acl.user_exists(admin_client, "xp-team-b.everything")


def test_an_organism_admitted_before_the_rules_is_disabled(shared_admin: SharedRedisAdmin,
                                                           admin_client: redis.Redis) -> None:
    """An Organism admitted by an older operator with another's default prefix: when observed, its user
    is disabled (it must not keep reading what may be another organism's keys)."""
    from xml_pipeline_operator.tenancy.recovery import DesiredUser

    username = acl.username_for("team-b", "copy")
    acl.ensure_user(admin_client, username, "pw", "xp:team-a.orders:")
    shared_admin._desired[("team-b", "copy")] = DesiredUser(username, "xp:team-a.orders:", "pw")  # as admitted
    body = {"metadata": {"name": "copy", "namespace": "team-b", "uid": "u"},
            "spec": {"backend": {"redis": {"mode": "shared", "prefix": "xp:team-a.orders:"}}}}
    shared_admin.observe("team-b", "copy", body)
    user = acl.get_user(admin_client, username)
    assert user is not None and not user.enabled
    assert shared_admin.desired_users() == []  # recovery will not bring it back
