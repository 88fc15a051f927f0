"""The CA certificate of a TLS Redis through the operator: the CRD field of an external Redis and the
operator's shared-Redis CA become a read-only file in the pump and worker pods, named by organism.yaml;
the binding Secret carries ca.crt and tls "true"; the operator's probe and admin connection verify with
it. Pure functions of desired/, then the real kopf operator on kmock with a real TLS redis-server."""
from __future__ import annotations

import base64
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from redis_server import TLSFiles, TLSRedisServer

from xml_pipeline.client import OrganismClient
from xml_pipeline.errors import ConfigError
from xml_pipeline.memory import BackendConfig
from xml_pipeline.memory.context_buffer import ContextBuffer
from xml_pipeline.memory.redis_backend import RedisBackend
from xml_pipeline_operator import desired
from xml_pipeline_operator.desired import binding as binding_mod
from xml_pipeline_operator.desired import tls
from xml_pipeline_operator.model import SpecError, parse_organism
from xml_pipeline_operator.settings import OperatorSettings
from xml_pipeline_operator.tenancy.admin import SharedRedisAdmin

from . import test_operator_shared as base
from .conftest import ADMIN_PASSWORD
from .test_client_tls import start_tls

k8s, kubeconfig, start_operator = base.k8s, base.kubeconfig, base.start_operator
harness, create, get_obj, eventually, condition = base.harness, base.create, base.get_obj, base.eventually, base.condition
ORGANISMS, DEPLOYMENTS, LISTENERS = base.ORGANISMS, base.DEPLOYMENTS, base.LISTENERS
PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def body(name: str, redis_spec: dict[str, Any], *, workers: bool = True) -> dict[str, Any]:
    spec: dict[str, Any] = {"config": {"listeners": LISTENERS}, "backend": {"redis": redis_spec}}
    if workers:
        spec["workers"] = {"replicas": 1}
    return {"metadata": {"name": name, "namespace": "shop", "uid": "u-1"}, "spec": spec}


def external(url: str = "rediss://redis.example.com:6380/0", **extra: Any) -> dict[str, Any]:
    return {"mode": "external", "external": {"url": url, "passwordSecretRef": {"name": "auth"}, **extra}}


def pods(state: desired.DesiredState) -> list[dict[str, Any]]:
    return [o["spec"]["template"]["spec"] for o in state.workloads if o["kind"] == "Deployment"
            and o["metadata"]["name"].endswith(("-pump", "-worker"))]


# -- pure functions ---------------------------------------------------------------------------------------
def test_external_tls_ca_secret_is_parsed_and_validated() -> None:
    s = OperatorSettings()
    org = parse_organism(body("ext", external(caSecretRef={"name": "redis-ca"})), s)
    assert org.redis is not None and org.redis.external is not None
    assert (org.redis.external.ca.name, org.redis.external.ca.key) == ("redis-ca", "ca.crt")  # type: ignore[union-attr]
    for ref, field, words in (
            ({"name": "c"}, "spec.backend.redis.external.caSecretRef", "rediss://"),
            ({}, "spec.backend.redis.external.caSecretRef.name", "not a Secret name"),
            ({"name": "Bad_Name"}, "spec.backend.redis.external.caSecretRef.name", "not a Secret name"),
            ({"name": "c", "key": "../x"}, "spec.backend.redis.external.caSecretRef.key", "not a Secret key"),
            ({"name": "c", "file": "/x"}, "spec.backend.redis.external.caSecretRef.file", "not a known field")):
        url = "redis://redis.example.com:6379/0" if "rediss://" in words else "rediss://redis.example.com:6380/0"
        with pytest.raises(SpecError) as caught:
            parse_organism(body("ext", external(url, caSecretRef=ref)), s)
        assert caught.value.field == field and words in str(caught.value), (ref, str(caught.value))


def test_external_ca_is_mounted_read_only_and_named_by_organism_yaml() -> None:
    org = parse_organism(body("ext", external(caSecretRef={"name": "redis-ca", "key": "root.pem"})),
                         OperatorSettings())
    state = desired.build(org, OperatorSettings())
    specs = pods(state)
    assert len(specs) == 2
    for spec in specs:
        assert {"name": "redis-ca", "secret": {"secretName": "redis-ca", "items": [{"key": "root.pem", "path": "ca.crt"}]}} \
            in spec["volumes"]
        mounts = spec["containers"][0]["volumeMounts"]
        assert {"name": "redis-ca", "mountPath": tls.CA_DIR, "readOnly": True} in mounts
        # The CA is a file, never an environment variable.
        assert all("ca" not in (e.get("valueFrom") or {}).get("secretKeyRef", {}).get("key", "")
                   for e in spec["containers"][0]["env"])
    doc = yaml.safe_load(state.config_map["data"]["organism.yaml"])
    assert doc["backend"]["redis_ca_cert"] == tls.CA_PATH == "/etc/xml-pipeline/redis-ca/ca.crt"
    # Without tls: no volume, no path (the system trust store verifies a rediss:// server).
    plain = desired.build(parse_organism(body("ext", external()), OperatorSettings()), OperatorSettings())
    assert all(v["name"] != "redis-ca" for spec in pods(plain) for v in spec["volumes"])
    assert "redis_ca_cert" not in yaml.safe_load(plain.config_map["data"]["organism.yaml"])["backend"]
    assert plain.config_hash != state.config_hash  # adding a CA rolls the pods


def test_shared_ca_comes_from_the_credentials_secret_and_goes_into_the_binding() -> None:
    s = OperatorSettings(shared_redis_url="rediss://shared.platform.svc:6380/0", shared_redis_ca=PEM)
    org = parse_organism(body("orders", {"mode": "shared"}), s)
    state = desired.build(org, s)
    for spec in pods(state):
        assert {"name": "redis-ca", "secret": {"secretName": "orders-credentials",
                                               "items": [{"key": "ca.crt", "path": "ca.crt"}]}} in spec["volumes"]
    assert yaml.safe_load(state.config_map["data"]["organism.yaml"])["backend"]["redis_ca_cert"] == tls.CA_PATH
    values = binding_mod.binding_values(org, s.shared_redis_url or "", {"signing-key": "k" * 64, "ca.crt": PEM}, "pw")
    assert values["tls"] == "true" and values["ca.crt"] == PEM
    # A new CA rolls the pods (the pump's pipe reads it at start).
    renewed = desired.build(org, dataclasses.replace(s, shared_redis_ca=PEM + PEM))
    assert renewed.config_hash != state.config_hash
    # A plain shared Redis: no CA anywhere.
    plain = OperatorSettings(shared_redis_url="redis://shared.platform.svc:6379/0")
    assert tls.ca_source(parse_organism(body("orders", {"mode": "shared"}), plain), plain) is None
    assert "ca.crt" not in binding_mod.binding_values(org, "redis://shared:6379/0", {"ca.crt": PEM}, "pw")
    # A dedicated Redis speaks plain TCP in the namespace.
    assert tls.ca_source(parse_organism(body("d", {"mode": "dedicated"}), s), s) is None


def test_shared_ca_file_setting_is_validated(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text(PEM)
    env = {"XPO_SHARED_REDIS_URL": "rediss://shared:6380/0", "XPO_SHARED_REDIS_CA_FILE": str(ca)}
    assert OperatorSettings.from_env(env).shared_redis_ca == PEM
    for changes, words in (({"XPO_SHARED_REDIS_URL": "redis://shared:6379/0"}, "does not use TLS"),
                           ({"XPO_SHARED_REDIS_CA_FILE": str(tmp_path / "none")}, "cannot be read"),
                           ({"XPO_SHARED_REDIS_CA_FILE": str(tmp_path)}, "cannot be read")):
        with pytest.raises(ConfigError) as caught:
            OperatorSettings.from_env(env | changes)
        assert caught.value.field == "XPO_SHARED_REDIS_CA_FILE" and words in str(caught.value)
    ca.write_text("not a certificate")
    with pytest.raises(ConfigError, match="holds no PEM certificate"):
        OperatorSettings.from_env(env)


# -- the operator on kmock with a real TLS redis-server ----------------------------------------------------
@pytest.fixture
def tls_shared(tls_files: TLSFiles) -> Iterator[TLSRedisServer]:
    server = start_tls(tls_files, ADMIN_PASSWORD)
    yield server
    server.cleanup()


@pytest.fixture
def run_tls_operator(start_operator: Any, tls_shared: TLSRedisServer) -> Callable[..., Any]:
    async def run() -> Any:
        settings = dataclasses.replace(harness.TEST_SETTINGS, shared_redis_url=tls_shared.url,
                                       shared_redis_password=ADMIN_PASSWORD,
                                       shared_redis_ca=tls_shared.tls.ca.read_text())
        return await start_operator(settings, admin=SharedRedisAdmin(settings, usage_interval=0.2,
                                                                     user_check_interval=0.2))
    return run


def decoded(obj: dict[str, Any] | None) -> dict[str, str]:
    assert obj is not None
    return {k: base64.b64decode(v).decode() for k, v in obj["data"].items()}


def mount_items(values: dict[str, str], directory: Path) -> Path:
    """A Secret as the kubelet mounts it: one file per key."""
    directory.mkdir(parents=True)
    for k, v in values.items():
        (directory / k).write_text(v)
    return directory


async def test_shared_tls_redis_ca_reaches_pods_and_binding(k8s: Any, run_tls_operator: Any,
                                                            tls_shared: TLSRedisServer, tmp_path: Path) -> None:
    await run_tls_operator()
    await create(k8s, "shop", {"config": {"listeners": LISTENERS}, "workers": {"replicas": 1},
                               "backend": {"redis": {"mode": "shared", "ttl": 600}}})
    org = await eventually(lambda: (o := get_obj(k8s, ORGANISMS, "shop")) and (o.get("status") or {}).get("binding") and o)
    assert condition(org, "RedisReady")["status"] == "True"  # the operator's admin connection verified the CA
    ca = tls_shared.tls.ca.read_text()
    creds, bound = decoded(get_obj(k8s, "v1/secrets", "shop-credentials")), decoded(get_obj(k8s, "v1/secrets", "shop-binding"))
    assert creds["ca.crt"] == ca and bound["ca.crt"] == ca and bound["tls"] == "true"
    assert bound["url"] == tls_shared.url
    for dep in ("shop-pump", "shop-worker"):
        spec = get_obj(k8s, DEPLOYMENTS, dep)["spec"]["template"]["spec"]
        vol = next(v for v in spec["volumes"] if v["name"] == "redis-ca")
        assert vol["secret"] == {"secretName": "shop-credentials", "items": [{"key": "ca.crt", "path": "ca.crt"}]}
        assert {"name": "redis-ca", "mountPath": tls.CA_DIR, "readOnly": True} in spec["containers"][0]["volumeMounts"]

    # A pump pod: organism.yaml from the ConfigMap (its CA path moved to where this test mounted the item)
    # and the XP_* credentials from the Secret; it writes a thread over TLS.
    cm = get_obj(k8s, "v1/configmaps", "shop-config")
    section = yaml.safe_load(cm["data"]["organism.yaml"])["backend"]
    assert section["redis_ca_cert"] == tls.CA_PATH
    pod_ca = mount_items({"ca.crt": creds["ca.crt"]}, tmp_path / "pod-ca") / "ca.crt"
    pod_config = BackendConfig.from_dict({**section, "redis_ca_cert": str(pod_ca)}).replace(
        redis_username=creds["redis-username"], redis_password=creds["redis-password"], signing_key=creds["signing-key"])
    with RedisBackend(pod_config) as pod:
        ContextBuffer(pod).append("t-tls", "<order/>", "shop", "console")
    # A client pod with the binding mounted: reads the thread over TLS with the binding's ca.crt.
    with OrganismClient(BackendConfig.from_binding(mount_items(bound, tmp_path / "bindings" / "shop"))) as client:
        assert [s.payload for s in client.read_thread("t-tls")] == ["<order/>"]


async def test_external_tls_probe_uses_the_ca_secret(k8s: Any, start_operator: Any, tls_shared: TLSRedisServer,
                                                     tmp_path: Path) -> None:
    await start_operator()
    secrets = {"ext-auth": {"password": ADMIN_PASSWORD}, "ext-ca": {"ca.crt": tls_shared.tls.ca.read_text()},
               "ext-wrong-ca": {"ca.crt": tls_shared.tls.other_ca.read_text()}}
    for name, data in secrets.items():
        resp = await k8s.post("/api/v1/namespaces/default/secrets", json={
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}})
        assert resp.status == 201, await resp.text()
    for name, ca_secret in (("good", "ext-ca"), ("wrong", "ext-wrong-ca"), ("missing", "ext-nope")):
        await create(k8s, name, {"config": {"listeners": LISTENERS}, "backend": {"redis": {
            "mode": "external", "external": {"url": tls_shared.url, "passwordSecretRef": {"name": "ext-auth"},
                                             "caSecretRef": {"name": ca_secret}}}}})

    def reason(n: str) -> str:
        return (condition(get_obj(k8s, ORGANISMS, n), "RedisReady") or {}).get("reason", "")
    await eventually(lambda: reason("good") == "ExternalRedisReachable")
    await eventually(lambda: reason("wrong") == "ExternalRedisUnreachable")
    assert "certificate verify failed" in condition(get_obj(k8s, ORGANISMS, "wrong"), "RedisReady")["message"]
    await eventually(lambda: reason("missing") == "ExternalSecretMissing")
    assert "'ext-nope' (spec.backend.redis.external.caSecretRef)" in condition(
        get_obj(k8s, ORGANISMS, "missing"), "RedisReady")["message"]
    pump = get_obj(k8s, DEPLOYMENTS, "good-pump")["spec"]["template"]["spec"]
    assert {"name": "redis-ca", "secret": {"secretName": "ext-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]}} \
        in pump["volumes"]
    assert get_obj(k8s, DEPLOYMENTS, "missing-pump") is None  # pods would not start without the Secret
