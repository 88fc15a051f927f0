"""Unit tests of the pure builders: every field of the spec ends up where it should."""
from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from xml_pipeline.memory.config import BackendConfig
from xml_pipeline.organism import parse_organism as parse_library_organism
from xml_pipeline_operator import desired
from xml_pipeline_operator.desired import credentials, naming
from xml_pipeline_operator.model import Organism, parse_organism
from xml_pipeline_operator.redis_admin import acl_username
from xml_pipeline_operator.settings import OperatorSettings

SETTINGS = OperatorSettings(default_image="registry.example/xp:1.2.3", default_ttl=7200,
                            redis_image="redis:7.2.5-alpine",
                            shared_redis_url="redis://shared-redis.platform.svc:6379/0")
LISTENERS = [{"name": "greeter", "handler": "xml_pipeline.examples.greeter:handle"},
             {"name": "primes", "handler": "xml_pipeline.examples.cpu:count_primes", "cpu_bound": True}]
CONTRACT_ENV = ["XP_ORGANISM", "XP_ROLE", "XP_BACKEND_TYPE", "XP_REDIS_URL", "XP_REDIS_USERNAME", "XP_REDIS_PASSWORD",
                "XP_REDIS_PREFIX", "XP_REDIS_TTL", "XP_SIGNING_KEY", "XP_CONFIG"]


def make(spec: dict[str, Any] | None = None, name: str = "orders", namespace: str = "shop",
         settings: OperatorSettings = SETTINGS) -> tuple[Organism, desired.DesiredState]:
    body = {"metadata": {"name": name, "namespace": namespace, "uid": "uid-1", "generation": 3},
            "spec": {"config": {"listeners": copy.deepcopy(LISTENERS)}, **(spec or {})}}
    org = parse_organism(body, settings)
    return org, desired.build(org, settings)


def by_name(state: desired.DesiredState) -> dict[str, dict[str, Any]]:
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in [state.config_map, *state.workloads]}


def container(obj: dict[str, Any]) -> dict[str, Any]:
    (c,) = obj["spec"]["template"]["spec"]["containers"]
    return c


def env(obj: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(obj)["env"]}


def pods(state: desired.DesiredState) -> list[dict[str, Any]]:
    return [o for o in state.workloads if o["kind"] in ("Deployment", "StatefulSet")]


# ------------------------------------------------------------------------------------ object inventory
def test_dedicated_redis_objects_and_names() -> None:
    _, state = make({"workers": {"replicas": 2}})
    assert sorted(by_name(state)) == ["ConfigMap/orders-config", "Deployment/orders-pump", "Deployment/orders-redis",
                                      "Deployment/orders-worker", "NetworkPolicy/orders-redis",
                                      "PodDisruptionBudget/orders-worker", "Service/orders-redis"]
    assert state.workloads[0]["kind"] == "NetworkPolicy"  # in place before the Redis pod starts
    assert state.absent == [("StatefulSet", "orders-redis")]
    assert state.absent_after_change == [("HorizontalPodAutoscaler", "orders-worker"), ("PodDisruptionBudget", "orders-pump")]
    assert state.secret_name == "orders-credentials"
    assert state.endpoint == "redis://orders-redis.shop.svc:6379/0"


def test_persistent_redis_is_a_statefulset_with_a_retained_claim() -> None:
    org, state = make({"backend": {"redis": {"dedicated": {"persistence": {
        "enabled": True, "size": "5Gi", "storageClassName": "fast-ssd"}}}}})
    sts = by_name(state)["StatefulSet/orders-redis"]
    assert ("Deployment", "orders-redis") in state.absent
    assert sts["spec"]["serviceName"] == "orders-redis"
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"] == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "5Gi"}},
                             "storageClassName": "fast-ssd"}
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    volumes = {v["name"] for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert "data" not in volumes  # comes from the claim, not an emptyDir
    assert "--appendonly yes" in container(sts)["command"][2]


@pytest.mark.parametrize("spec, absent", [
    ({"backend": {"redis": {"mode": "shared"}}}, {"NetworkPolicy", "Service", "Deployment", "StatefulSet"}),
    ({"backend": {"redis": {"mode": "external", "external": {
        "url": "rediss://r.example:6380/1", "passwordSecretRef": {"name": "ext"}}}}}, {"NetworkPolicy", "Service", "Deployment", "StatefulSet"}),
    ({"backend": {"type": "memory"}}, {"NetworkPolicy", "Service", "Deployment", "StatefulSet"}),
    ({"backend": {"type": "manager"}}, {"NetworkPolicy", "Service", "Deployment", "StatefulSet"}),
])
def test_no_redis_is_provisioned_outside_dedicated_mode(spec: dict[str, Any], absent: set[str]) -> None:
    _, state = make(spec)
    assert [o["kind"] for o in state.workloads] == ["Deployment"]  # the pump only
    assert {k for k, n in state.absent if n == "orders-redis"} == absent
    assert ("Deployment", "orders-worker") in state.absent


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and In expressions: all this policy uses)."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In"
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def test_dedicated_redis_accepts_only_its_organisms_pods() -> None:
    _, state = make({"workers": {"replicas": 2}})
    objs = by_name(state)
    policy = objs["NetworkPolicy/orders-redis"]["spec"]
    redis_pod = objs["Deployment/orders-redis"]["spec"]["template"]["metadata"]["labels"]
    assert _selects(policy["podSelector"], redis_pod) and policy["policyTypes"] == ["Ingress"]

    def admitted(pod_labels: dict[str, str]) -> bool:
        return any(any(_selects(peer["podSelector"], pod_labels) for peer in rule["from"])
                   for rule in policy["ingress"])

    for name in ("Deployment/orders-pump", "Deployment/orders-worker"):
        assert admitted(objs[name]["spec"]["template"]["metadata"]["labels"]), name
    _, other = make({"workers": {"replicas": 1}}, name="billing")
    for obj in pods(other):  # another organism's pump and workers, in the same namespace
        assert not admitted(obj["spec"]["template"]["metadata"]["labels"])
    assert not admitted(redis_pod) and not admitted({"app": "anything"})
    assert admitted({naming.REDIS_CLIENT_LABEL: "orders"}) and not admitted({naming.REDIS_CLIENT_LABEL: "billing"})
    assert all(rule["ports"] == [{"protocol": "TCP", "port": 6379}] for rule in policy["ingress"])


# ------------------------------------------------------------------------------- labels and ownership
def test_every_object_has_the_contract_labels_and_an_owner_reference() -> None:
    _, state = make({"workers": {"replicas": 1}, "backend": {"redis": {"dedicated": {"persistence": {"enabled": True}}}}})
    secret = credentials.credentials_secret(make()[0], credentials.generate(make()[0]))
    for obj in [state.config_map, *state.workloads, secret]:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "xml-pipeline"
        assert labels["app.kubernetes.io/instance"] == "orders"
        assert labels["app.kubernetes.io/managed-by"] == "xml-pipeline-operator"
        assert labels["xml-pipeline.dev/organism"] == "orders"
        assert labels["app.kubernetes.io/component"] in ("pump", "worker", "redis", "config", "credentials")
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref == {"apiVersion": "xml-pipeline.dev/v1alpha1", "kind": "Organism", "name": "orders",
                       "uid": "uid-1", "controller": True, "blockOwnerDeletion": True}
        assert obj["metadata"]["namespace"] == "shop"
    for obj in pods(state):
        template_labels = obj["spec"]["template"]["metadata"]["labels"]
        assert obj["spec"]["selector"]["matchLabels"].items() <= template_labels.items()
        assert template_labels["xml-pipeline.dev/organism"] == "orders"
    service = by_name(make()[1])["Service/orders-redis"]
    assert service["spec"]["selector"] == naming.selector_labels("orders", "redis")


# ----------------------------------------------------------------------------------------- environment
def test_pump_and_worker_get_exactly_the_contract_environment() -> None:
    _, state = make({"workers": {"replicas": 2}, "backend": {"redis": {"ttl": 600, "prefix": "xp:orders:"}}})
    objs = by_name(state)
    for role in ("pump", "worker"):
        c = container(objs[f"Deployment/orders-{role}"])
        assert [e["name"] for e in c["env"]] == CONTRACT_ENV
        e = env(objs[f"Deployment/orders-{role}"])
        assert e["XP_ORGANISM"] == "orders" and e["XP_ROLE"] == role and e["XP_BACKEND_TYPE"] == "redis"
        assert e["XP_REDIS_URL"] == "redis://orders-redis.shop.svc:6379/0" and "@" not in e["XP_REDIS_URL"]
        assert e["XP_REDIS_PREFIX"] == "xp:orders:" and e["XP_REDIS_TTL"] == "600"
        assert e["XP_CONFIG"] == "/etc/xml-pipeline/organism.yaml"
        for var, key in (("XP_REDIS_USERNAME", "redis-username"), ("XP_REDIS_PASSWORD", "redis-password"),
                         ("XP_SIGNING_KEY", "signing-key")):
            assert e[var] == {"secretKeyRef": {"name": "orders-credentials", "key": key}}
        assert c["command"] == (["xml-pipeline", "pump", "--metrics-port", "9102"] if role == "pump"
                                else ["xml-pipeline", "worker"])
        assert c.get("ports", []) == ([{"name": "metrics", "containerPort": 9102, "protocol": "TCP"}]
                                      if role == "pump" else [])
        assert c["image"] == "registry.example/xp:1.2.3"  # XPO_DEFAULT_IMAGE
        assert objs[f"Deployment/orders-{role}"]["spec"]["template"]["spec"]["enableServiceLinks"] is False


def test_memory_backend_leaves_out_the_redis_variables() -> None:
    _, state = make({"backend": {"type": "memory"}})
    assert list(env(state.workloads[0])) == ["XP_ORGANISM", "XP_ROLE", "XP_BACKEND_TYPE", "XP_SIGNING_KEY", "XP_CONFIG"]


def test_external_mode_injects_the_users_secret_and_url() -> None:
    _, state = make({"backend": {"redis": {"mode": "external", "external": {
        "url": "rediss://r.example:6380/1", "passwordSecretRef": {"name": "ext-auth", "key": "pw"},
        "usernameSecretRef": {"name": "ext-auth", "key": "user"}}}}, "workers": {}})
    for obj in pods(state):
        e = env(obj)
        assert e["XP_REDIS_URL"] == "rediss://r.example:6380/1"
        assert e["XP_REDIS_PASSWORD"] == {"secretKeyRef": {"name": "ext-auth", "key": "pw"}}
        assert e["XP_REDIS_USERNAME"] == {"secretKeyRef": {"name": "ext-auth", "key": "user"}}
        assert e["XP_SIGNING_KEY"] == {"secretKeyRef": {"name": "orders-credentials", "key": "signing-key"}}


def test_shared_mode_uses_the_shared_url_and_a_per_organism_user() -> None:
    org, state = make({"backend": {"redis": {"mode": "shared"}}})
    assert env(state.workloads[0])["XP_REDIS_URL"] == SETTINGS.shared_redis_url
    assert state.redis_username == acl_username("shop", "orders") == "xp-shop.orders"
    assert credentials.generate(org)["redis-username"] == "xp-shop.orders"


def test_the_pod_contract_round_trips_through_the_library(tmp_path: Path) -> None:
    """What a pod sees (mounted organism.yaml + env with Secrets resolved) gives the intended BackendConfig."""
    org, state = make({"workers": {"replicas": 1}, "backend": {"redis": {"ttl": 900}}})
    secret_values = credentials.generate(org)
    config_file = tmp_path / "organism.yaml"
    config_file.write_text(state.config_map["data"]["organism.yaml"])
    environ = {}
    for e in container(by_name(state)["Deployment/orders-worker"])["env"]:
        if "value" in e:
            environ[e["name"]] = e["value"]
        else:
            environ[e["name"]] = secret_values[e["valueFrom"]["secretKeyRef"]["key"]]
    environ["XP_CONFIG"] = str(config_file)  # the mount path, relocated for the test
    config = BackendConfig.from_env(environ)
    assert (config.backend_type, config.redis_url, config.redis_prefix, config.redis_ttl) == (
        "redis", "redis://orders-redis.shop.svc:6379/0", "xp:shop.orders:", 900)
    assert config.redis_username == "default" and config.redis_password == secret_values["redis-password"]
    assert config.signing_keys == (secret_values["signing-key"].encode(),)
    organism = parse_library_organism(config_file.read_text(), environ=environ, resolve_handlers=False)
    assert organism.name == "orders" and [ls.name for ls in organism.listeners] == ["greeter", "primes"]


# ----------------------------------------------------------------------------------------- config map
def test_config_map_has_the_backend_section_and_no_secrets() -> None:
    org, state = make({"config": {"organism": {"description": "d"}, "process_pool": {"workers": 3, "start_method": "forkserver"},
                                  "listeners": LISTENERS}, "backend": {"redis": {"ttl": 120}}})
    doc = yaml.safe_load(state.config_map["data"]["organism.yaml"])
    assert doc["organism"] == {"name": "orders", "description": "d"}
    assert doc["backend"] == {"type": "redis", "redis_url": "redis://orders-redis.shop.svc:6379/0",
                              "redis_prefix": "xp:shop.orders:", "redis_ttl": 120}
    assert doc["process_pool"] == {"workers": 3, "start_method": "forkserver"}
    assert doc["listeners"] == LISTENERS
    secret_values = credentials.generate(org)
    rendered = json.dumps([state.config_map, *state.workloads])
    assert not any(v in rendered for k, v in secret_values.items() if k != "redis-username")
    assert "password" not in state.config_map["data"]["organism.yaml"]


def test_worker_processes_override_the_config_pool() -> None:
    _, state = make({"config": {"process_pool": {"workers": 3}, "listeners": LISTENERS}, "workers": {"processes": 5}})
    assert yaml.safe_load(state.config_map["data"]["organism.yaml"])["process_pool"]["workers"] == 5
    org, _ = make({"config": {"process_pool": {"workers": 3}, "listeners": LISTENERS}, "workers": {}})
    assert org.workers is not None and org.workers.processes == 3


def test_config_is_mounted_read_only_at_etc_xml_pipeline() -> None:
    _, state = make({"workers": {}})
    for obj in pods(state):
        if obj["metadata"]["labels"]["app.kubernetes.io/component"] == "redis":
            continue
        mounts = {m["mountPath"]: m for m in container(obj)["volumeMounts"]}
        assert mounts["/etc/xml-pipeline"] == {"name": "config", "mountPath": "/etc/xml-pipeline", "readOnly": True}
        volumes = {v["name"]: v for v in obj["spec"]["template"]["spec"]["volumes"]}
        assert volumes["config"]["configMap"] == {"name": "orders-config",
                                                  "items": [{"key": "organism.yaml", "path": "organism.yaml"}]}


# ------------------------------------------------------------------------------------------- security
@pytest.mark.parametrize("spec", [
    {"workers": {"replicas": 1}},
    {"backend": {"redis": {"dedicated": {"persistence": {"enabled": True}}}}},
    {"backend": {"type": "manager"}},
])
def test_every_pod_is_restricted(spec: dict[str, Any]) -> None:
    _, state = make(spec)
    for obj in pods(state):
        pod = obj["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and isinstance(psc["runAsUser"], int) and psc["runAsUser"] > 0
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsNonRoot"] is True
            tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp, "a read-only root filesystem needs a writable /tmp"
            assert any(v["name"] == tmp[0]["name"] and "emptyDir" in v for v in pod["volumes"])
            assert c["livenessProbe"] and c["readinessProbe"]
    redis = [o for o in pods(state) if o["metadata"]["labels"]["app.kubernetes.io/component"] == "redis"]
    for obj in redis:
        assert obj["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 999


def test_redis_password_is_never_in_the_pod_spec() -> None:
    org, state = make({"backend": {"redis": {"dedicated": {"resources": {"limits": {"memory": "1Gi"}}}}}})
    redis = by_name(state)["Deployment/orders-redis"]
    c = container(redis)
    script = c["command"][2]
    assert c["command"][:2] == ["sh", "-c"] and "requirepass $pw" in script and "unset REDIS_PASSWORD" in script
    assert "exec redis-server - " in script  # config (with the password) read from stdin, not argv
    assert env(redis)["REDIS_PASSWORD"] == {"secretKeyRef": {"name": "orders-credentials", "key": "redis-password"}}
    assert f"--maxmemory {int(1024**3 * 0.8)}" in script and "--maxmemory-policy noeviction" in script
    assert c["resources"] == {"limits": {"memory": "1Gi"}}  # explicit resources replace the defaults whole
    assert all("value" not in e for e in c["env"])  # only secretKeyRefs


def test_resources_and_replicas_land_on_their_containers() -> None:
    _, state = make({"pump": {"resources": {"requests": {"cpu": "1", "memory": "1Gi"}}},
                     "workers": {"replicas": 4, "resources": {"limits": {"cpu": 2, "memory": "2Gi"}}}})
    objs = by_name(state)
    pump, worker = objs["Deployment/orders-pump"], objs["Deployment/orders-worker"]
    assert container(pump)["resources"] == {"requests": {"cpu": "1", "memory": "1Gi"}}
    assert container(worker)["resources"] == {"limits": {"cpu": "2", "memory": "2Gi"}}
    assert pump["spec"]["replicas"] == 1 and pump["spec"]["strategy"] == {"type": "Recreate", "rollingUpdate": None}
    assert worker["spec"]["replicas"] == 4


def test_default_resources_apply_when_none_are_given() -> None:
    _, state = make({"workers": {}})
    for obj in pods(state):
        assert container(obj)["resources"]["limits"]["memory"]


# ------------------------------------------------------------------------------------------ roll-outs
def _hash(spec: dict[str, Any], settings: OperatorSettings = SETTINGS) -> str:
    _, state = make(spec, settings=settings)
    hashes = {o["spec"]["template"]["metadata"]["annotations"][naming.CONFIG_HASH_ANNOTATION]
              for o in state.workloads if o["kind"] == "Deployment"
              and o["metadata"]["labels"]["app.kubernetes.io/component"] in ("pump", "worker")}
    assert hashes == {state.config_hash}
    return state.config_hash


BASE = {"workers": {"replicas": 2}, "backend": {"redis": {"ttl": 600}}}


@pytest.mark.parametrize("change", [
    {"config": {"listeners": LISTENERS[:1]}},
    {"backend": {"redis": {"ttl": 601}}},
    {"image": "registry.example/xp:1.2.4"},
    {"workers": {"replicas": 2, "processes": 4}},
], ids=["config", "ttl", "image", "worker-processes"])
def test_a_change_pods_read_at_start_changes_the_config_hash(change: dict[str, Any]) -> None:
    assert _hash({**BASE, **change}) != _hash(BASE)


def test_scaling_workers_does_not_roll_the_pods() -> None:
    assert _hash({**BASE, "workers": {"replicas": 5}}) == _hash(BASE)


# ------------------------------------------------------------------------------------------ credentials
def test_credentials_secret_is_base64_data_with_the_three_keys() -> None:
    org, _ = make()
    values = credentials.generate(org)
    secret = credentials.credentials_secret(org, values)
    assert secret["type"] == "Opaque" and "stringData" not in secret
    assert set(secret["data"]) == {"redis-username", "redis-password", "signing-key"}
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == values
    assert len(values["redis-password"]) == 64 and len(values["signing-key"]) == 64
    assert credentials.generate(org)["redis-password"] != values["redis-password"]


def test_existing_credentials_are_completed_never_replaced() -> None:
    org, _ = make()
    current = {"redis-username": "default", "redis-password": "keep-me"}
    changes = credentials.completion(org, current, credentials.generate(org))
    assert set(changes) == {"signing-key"}
    shared, _ = make({"backend": {"redis": {"mode": "shared"}}})
    full = {"redis-username": "default", "redis-password": "keep-me", "signing-key": "k" * 32}
    assert credentials.completion(shared, full, credentials.generate(shared)) == {"redis-username": "xp-shop.orders"}
