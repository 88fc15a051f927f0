"""Password rotation in shared mode: the pure state machine (rotation.py), and the operator driving it
on kmock with a real shared redis-server -- the old password keeps working until the test (playing
the Deployment controller) reports the pods rolled, also across an operator restart."""
from __future__ import annotations

import base64
from typing import Any

import pytest
import redis
from redis_server import RedisServer

from xml_pipeline_operator import rotation
from xml_pipeline_operator.rotation import NEXT_KEY, PREVIOUS_KEY, Phase, Step
from xml_pipeline_operator.tenancy import acl

from . import test_operator_shared as shared_mode

# The shared-mode fixtures (kmock, the operator, a private shared redis-server), under their own names.
k8s, kubeconfig, start_operator = shared_mode.k8s, shared_mode.kubeconfig, shared_mode.start_operator
shared, admin_client, run_operator = shared_mode.shared, shared_mode.admin_client, shared_mode.run_operator
harness, create, credentials, redis_ready = (shared_mode.harness, shared_mode.create, shared_mode.credentials,
                                             shared_mode.redis_ready)
eventually, quiet, get_obj, condition = (shared_mode.eventually, shared_mode.quiet, shared_mode.get_obj,
                                         shared_mode.condition)
DEPLOYMENTS, ORGANISMS, MERGE, shared_spec = (shared_mode.DEPLOYMENTS, shared_mode.ORGANISMS, shared_mode.MERGE,
                                              shared_mode.shared_spec)

H = rotation.password_hash
SECRET = {"redis-username": "xp-ns.o", "redis-password": "old", "signing-key": "k1"}


# -- the state machine, pure -------------------------------------------------------------------------
def test_phase_follows_the_secret_before_the_status() -> None:
    assert rotation.phase_of(None, SECRET) is Phase.IDLE
    assert rotation.phase_of("Accepting", SECRET) is Phase.ACCEPTING  # requested, nothing generated yet
    assert rotation.phase_of(None, {**SECRET, NEXT_KEY: "new"}) is Phase.ACCEPTING  # crash before the status
    assert rotation.phase_of("Accepting", {**SECRET, PREVIOUS_KEY: H("x")}) is Phase.ROLLING_OUT  # published
    assert rotation.phase_of("RollingOut", SECRET) is Phase.IDLE  # retired, status not written yet


def test_steps_in_order() -> None:
    step = rotation.next_step
    assert step(phase=Phase.IDLE, request=False, secret=SECRET, redis_accepts_all=True, rolled=None,
                waited=0) is Step.IDLE
    assert step(phase=Phase.IDLE, request=True, secret=SECRET, redis_accepts_all=True, rolled=None,
                waited=0) is Step.START
    assert step(phase=Phase.ACCEPTING, request=False, secret=SECRET, redis_accepts_all=True, rolled=None,
                waited=0) is Step.GENERATE
    nxt = {**SECRET, NEXT_KEY: "new"}
    # Never publish before Redis said yes to the new password.
    assert step(phase=Phase.ACCEPTING, request=False, secret=nxt, redis_accepts_all=False, rolled=None,
                waited=0) is Step.ACCEPT
    assert step(phase=Phase.ACCEPTING, request=False, secret=nxt, redis_accepts_all=True, rolled=None,
                waited=0) is Step.PUBLISH
    published = {**SECRET, **{k: v for k, v in rotation.publish_patch(nxt).items() if v is not None}}
    assert published["redis-password"] == "new" and NEXT_KEY not in published
    assert rotation.previous_hashes(published) == {H("old")}
    assert rotation.accepted_besides_password(published) == {H("old")}
    roll: dict[str, Any] = {"phase": Phase.ROLLING_OUT, "request": False, "secret": published}
    assert step(**roll, redis_accepts_all=True, rolled=None, waited=10**6) is Step.WAIT_FOR_PODS
    assert step(**roll, redis_accepts_all=True, rolled=False, waited=5) is Step.WAIT_FOR_PODS
    # Pods never ready: say so, keep both passwords (never RETIRE without a finished rollout).
    assert step(**roll, redis_accepts_all=True, rolled=False, waited=3600, timeout=3600) is Step.STALLED
    assert step(**roll, redis_accepts_all=False, rolled=True, waited=0) is Step.ACCEPT
    assert step(**roll, redis_accepts_all=True, rolled=True, waited=0) is Step.RETIRE


def test_accepting_phase_makes_redis_accept_old_and_new() -> None:
    # Before publishing, the Secret's password is the old one and the next one is accepted too.
    assert rotation.accepted_besides_password({**SECRET, NEXT_KEY: "new"}) == {H("new")}
    assert rotation.accepted_besides_password(SECRET) == frozenset()


def test_hand_edit_is_adopted() -> None:
    edited = {**SECRET, "redis-password": "typed-by-hand"}
    patch = rotation.adopt_patch(edited, {H("old"), H("typed-by-hand")})
    assert patch == {PREVIOUS_KEY: H("old")}
    assert rotation.previous_hashes({PREVIOUS_KEY: f"{H('a')}, junk ,{H('b').upper()}"}) == {H("a"), H("b")}


def test_digest_is_keyed_and_reveals_nothing() -> None:
    d = rotation.credentials_digest(SECRET)
    assert d and d == rotation.credentials_digest(dict(SECRET))
    assert d != rotation.credentials_digest({**SECRET, "redis-password": "new"})  # a new password rolls
    assert d != rotation.credentials_digest({**SECRET, "signing-key": "k2"})  # keyed
    assert d not in H("old") and "old" not in d
    assert rotation.credentials_digest({**SECRET, "signing-key": ""}) is None  # never unkeyed


def test_rollout_complete_needs_every_pod_on_the_new_template() -> None:
    def dep(digest: str = "d", gen: int = 2, observed: int | None = 2, replicas: int = 2, updated: int = 2,
            available: int = 2, total: int = 2) -> dict[str, Any]:
        st = {"updatedReplicas": updated, "availableReplicas": available, "replicas": total}
        if observed is not None:
            st["observedGeneration"] = observed
        return {"metadata": {"generation": gen},
                "spec": {"replicas": replicas,
                         "template": {"metadata": {"annotations": {rotation.DIGEST_ANNOTATION: digest}}}},
                "status": st}
    assert rotation.rollout_complete(dep(), "d")
    assert not rotation.rollout_complete(dep(), "other")          # template not updated yet
    assert not rotation.rollout_complete(dep(observed=1), "d")    # controller has not seen it
    assert not rotation.rollout_complete(dep(observed=None), "d")
    assert not rotation.rollout_complete(dep(updated=1), "d")
    assert not rotation.rollout_complete(dep(available=1), "d")
    assert not rotation.rollout_complete(dep(total=3), "d")       # an old pod is still there
    assert rotation.rollout_complete(dep(replicas=0, updated=0, available=0, total=0), "d")
    assert not rotation.rollout_complete(None, "d")


# -- the operator, kmock + real redis-server ---------------------------------------------------------
SPEC_WORKERS = {**shared_spec(), "workers": {"replicas": 2}}


def can_login(server: RedisServer, username: str, password: str) -> bool:
    """A fresh connection and AUTH, as a pod starting (or reconnecting) does."""
    c = redis.Redis.from_url(server.url, username=username, password=password, socket_timeout=5)
    try:
        return bool(c.ping())
    except redis.AuthenticationError:
        return False
    finally:
        c.close()


async def mark_rolled(k8s: Any, name: str) -> None:
    """Play the Deployment controller: every replica updated and available for the current generation."""
    obj = get_obj(k8s, DEPLOYMENTS, name)
    assert obj is not None, name
    n = obj["spec"]["replicas"]
    status = {"observedGeneration": obj["metadata"]["generation"], "replicas": n, "readyReplicas": n,
              "updatedReplicas": n, "availableReplicas": n}
    resp = await k8s.patch(f"/apis/apps/v1/namespaces/default/deployments/{name}/status",
                           json={"status": status}, headers=MERGE)
    assert resp.status == 200


def digests(k8s: Any, name: str) -> set[str | None]:
    out = set()
    for dep in (f"{name}-pump", f"{name}-worker"):
        obj = get_obj(k8s, DEPLOYMENTS, dep)
        assert obj is not None
        out.add(obj["spec"]["template"]["metadata"]["annotations"].get(rotation.DIGEST_ANNOTATION))
    return out


def rotation_status(k8s: Any, name: str) -> dict[str, Any]:
    return ((get_obj(k8s, ORGANISMS, name) or {}).get("status") or {}).get("credentials") or {}


async def request_rotation(k8s: Any, name: str, value: str) -> None:
    resp = await k8s.patch(harness.org_path(name),
                           json={"metadata": {"annotations": {rotation.ROTATE_ANNOTATION: value}}}, headers=MERGE)
    assert resp.status == 200, await resp.text()


async def ready_shared_organism(k8s: Any, name: str) -> dict[str, str]:
    await create(k8s, name, SPEC_WORKERS)
    await eventually(lambda: redis_ready(k8s, name))
    await eventually(lambda: digests(k8s, name) != {None})
    for dep in (f"{name}-pump", f"{name}-worker"):
        await mark_rolled(k8s, dep)
    await eventually(lambda: condition(get_obj(k8s, ORGANISMS, name), "CredentialsCurrent"))
    return credentials(k8s, name)


async def test_rotation_keeps_the_old_password_until_the_pods_rolled(
        k8s: Any, run_operator: Any, shared: RedisServer, admin_client: redis.Redis) -> None:
    await run_operator()
    old = await ready_shared_organism(k8s, "rot")
    user, old_pw = old["redis-username"], old["redis-password"]
    old_digests = digests(k8s, "rot")
    assert len(old_digests) == 1 and old_pw not in str(old_digests)
    running_pod = redis.Redis.from_url(shared.url, username=user, password=old_pw)  # authenticated before
    assert running_pod.ping()

    await request_rotation(k8s, "rot", "2024-06-01")
    new = await eventually(lambda: (c := credentials(k8s, "rot"))["redis-password"] != old_pw and c)
    new_pw = new["redis-password"]
    assert len(new_pw) == 64 and new["signing-key"] == old["signing-key"] and NEXT_KEY not in new
    # Redis learnt the new password before the Secret handed it out, and still takes the old one.
    assert can_login(shared, user, new_pw) and can_login(shared, user, old_pw)
    # The pods are told to roll (pump and worker patched one after the other within a pass).
    await eventually(lambda: len(d := digests(k8s, "rot")) == 1 and d != old_digests)
    assert new_pw not in str(digests(k8s, "rot"))
    await eventually(lambda: rotation_status(k8s, "rot").get("phase") == "RollingOut")
    org = get_obj(k8s, ORGANISMS, "rot")
    assert condition(org, "CredentialsCurrent")["reason"] == "Rotating"
    assert condition(org, "Ready")["status"] == "False"  # the Deployments are rolling (not rotation's doing)

    # Only the pump has rolled: nothing is retired.
    await mark_rolled(k8s, "rot-pump")
    await quiet(k8s)
    assert can_login(shared, user, old_pw) and running_pod.ping()
    assert rotation_status(k8s, "rot")["phase"] == "RollingOut"

    await mark_rolled(k8s, "rot-worker")
    await eventually(lambda: rotation_status(k8s, "rot").get("phase") == "Idle")
    assert not can_login(shared, user, old_pw) and can_login(shared, user, new_pw)
    assert acl.get_user(admin_client, user).password_hashes == {acl.password_hash(new_pw)}  # type: ignore[union-attr]
    final = credentials(k8s, "rot")
    assert final["redis-password"] == new_pw and PREVIOUS_KEY not in final and NEXT_KEY not in final
    st = rotation_status(k8s, "rot")
    assert st["request"] == "2024-06-01" and st["lastRotation"].endswith("Z")
    assert condition(get_obj(k8s, ORGANISMS, "rot"), "CredentialsCurrent")["status"] == "True"
    # Re-applying changes nothing: no second rotation for the same annotation value.
    await quiet(k8s)
    assert credentials(k8s, "rot")["redis-password"] == new_pw
    running_pod.close()


async def test_restart_mid_rotation_resumes_without_locking_out(
        k8s: Any, run_operator: Any, shared: RedisServer) -> None:
    op = await run_operator()
    old = await ready_shared_organism(k8s, "phx")
    user, old_pw = old["redis-username"], old["redis-password"]

    # The first operator dies between "Redis accepts the new password" and "publish it in the Secret".
    def no_publish(request: Any) -> int | None:
        data = request.data if isinstance(request.data, dict) else {}
        return 503 if request.method.value == "PATCH" and "redis-password" in (data.get("data") or {}) else None
    k8s.faults.append(no_publish)
    await request_rotation(k8s, "phx", "one")
    half = await eventually(lambda: NEXT_KEY in (c := credentials(k8s, "phx")) and c)
    await eventually(lambda: can_login(shared, user, half[NEXT_KEY]))
    await op.stop()
    assert credentials(k8s, "phx")["redis-password"] == old_pw
    assert rotation_status(k8s, "phx")["phase"] == "Accepting"
    assert can_login(shared, user, old_pw)

    k8s.faults.remove(no_publish)
    op = await run_operator()
    new = await eventually(lambda: (c := credentials(k8s, "phx"))["redis-password"] != old_pw and c)
    assert new["redis-password"] == half[NEXT_KEY]  # the password generated before the restart
    await eventually(lambda: rotation_status(k8s, "phx").get("phase") == "RollingOut")

    # And again while the pods roll: the old password stays accepted across the restart.
    await op.stop()
    await run_operator()
    await quiet(k8s)
    assert can_login(shared, user, old_pw) and can_login(shared, user, new["redis-password"])
    assert rotation_status(k8s, "phx")["phase"] == "RollingOut"
    for dep in ("phx-pump", "phx-worker"):
        await mark_rolled(k8s, dep)
    await eventually(lambda: rotation_status(k8s, "phx").get("phase") == "Idle")
    assert not can_login(shared, user, old_pw) and can_login(shared, user, new["redis-password"])


async def test_password_edited_in_the_secret_rolls_the_pods_before_retiring(
        k8s: Any, run_operator: Any, shared: RedisServer) -> None:
    await run_operator()
    old = await ready_shared_organism(k8s, "hand")
    user, old_pw = old["redis-username"], old["redis-password"]
    before = digests(k8s, "hand")
    typed = "typed-by-the-platform-team-0123456789"
    resp = await k8s.patch("/api/v1/namespaces/default/secrets/hand-credentials",
                           json={"data": {"redis-password": base64.b64encode(typed.encode()).decode()}}, headers=MERGE)
    assert resp.status == 200
    # The operator does not watch Secrets: any Organism event (here a label) or the resync notices.
    resp = await k8s.patch(harness.org_path("hand"), json={"metadata": {"labels": {"touched": "yes"}}}, headers=MERGE)
    assert resp.status == 200
    await eventually(lambda: can_login(shared, user, typed))
    await eventually(lambda: len(d := digests(k8s, "hand")) == 1 and d != before)
    assert can_login(shared, user, old_pw)  # pods started before the edit still log in
    assert rotation.previous_hashes(credentials(k8s, "hand")) == {rotation.password_hash(old_pw)}
    await quiet(k8s)
    assert can_login(shared, user, old_pw)
    for dep in ("hand-pump", "hand-worker"):
        await mark_rolled(k8s, dep)
    await eventually(lambda: rotation_status(k8s, "hand").get("phase") == "Idle" and PREVIOUS_KEY not in
                     credentials(k8s, "hand"))
    assert not can_login(shared, user, old_pw) and can_login(shared, user, typed)


@pytest.mark.parametrize("phase", ["Accepting", "RollingOut"])
def test_status_schema_knows_the_phase(phase: str) -> None:
    import yaml
    crd = yaml.safe_load(harness.CRD_PATH.read_text())
    props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert phase in props["credentials"]["properties"]["phase"]["enum"]
