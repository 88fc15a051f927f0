"""The client-pod injection webhook: the real kopf webhook server over HTTPS (its certificate's CA
published into the MutatingWebhookConfiguration on kmock), answering AdmissionReview requests."""
from __future__ import annotations

import base64
import copy
import dataclasses
import json
import ssl
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from operator_harness import TEST_SETTINGS, eventually, get_obj, org_path, organism
from kmock_cluster import Cluster
from redis_server import free_port
from xml_pipeline_operator import webhook
from xml_pipeline_operator.redis_admin import Tenant, TenantState

ROOT = Path(__file__).resolve().parents[2]
MWC = "xpo-clients"
MWC_PATH = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"
LISTENERS = [{"name": "greeter", "handler": "xml_pipeline.examples.greeter:handle"}]


class ReadyAdmin:
    """The shared Redis accepts every user (the ACL side is tested against redis-server elsewhere)."""

    def ensure_tenant(self, tenant: Tenant, password: str, also_accept_hashes: Any = frozenset()) -> TenantState:
        return TenantState(True, "AclUserReady", f"user {tenant.username}")

    def ensure_client(self, tenant: Tenant, username: str, password: str,
                      also_accept_hashes: Any = frozenset()) -> TenantState:
        return TenantState(True, "ClientUserReady", f"user {username}")

    def release_tenant(self, tenant: Tenant) -> None:
        del tenant


def pod(labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None,
        env: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "namespace": "default", "labels": labels or {},
                         "annotations": annotations or {}},
            "spec": {"containers": [{"name": "web", "image": "example/web:1", "env": env or []},
                                    {"name": "sidecar", "image": "example/side:1"}]}}


def review(obj: dict[str, Any], operation: str = "CREATE", *, dry_run: bool = False,
           old: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": str(uuid.uuid4()), "kind": {"group": "", "version": "v1", "kind": "Pod"},
                        "resource": {"group": "", "version": "v1", "resource": "pods"},
                        "namespace": obj["metadata"]["namespace"], "name": obj["metadata"]["name"],
                        "operation": operation, "userInfo": {"username": "alice"}, "object": obj,
                        "oldObject": old, "dryRun": dry_run}}


def apply_json_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 add/replace/remove on a copy (what the API server does with the answer)."""
    out = copy.deepcopy(doc)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
        parent: Any = out
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent.setdefault(p, {})
        last = parts[-1]
        if op["op"] in ("add", "replace"):
            if isinstance(parent, list):
                if last == "-":
                    parent.append(op["value"])
                elif op["op"] == "add":
                    parent.insert(int(last), op["value"])
                else:
                    parent[int(last)] = op["value"]
            else:
                parent[last] = op["value"]
        elif op["op"] == "remove":
            del parent[int(last) if isinstance(parent, list) else last]
        else:
            raise AssertionError(f"unexpected patch op {op}")
    return out


@pytest.fixture
async def hook(k8s: Cluster, start_operator: Any) -> Any:
    """The operator with its webhook on; organisms "shop" (shared), "local" (dedicated), both bound, and
    "ext" (external Redis: no binding)."""
    # As the chart renders it (without a caBundle: the operator provides that).
    mwc = {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
           "metadata": {"name": MWC},
           "webhooks": [{"name": "client-pods.xml-pipeline.dev", "sideEffects": "None", "failurePolicy": "Fail",
                         "admissionReviewVersions": ["v1"],
                         "objectSelector": {"matchExpressions": [{"key": webhook.CLIENT_LABEL, "operator": "Exists"}]},
                         "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"],
                                    "operations": ["CREATE"]}],
                         "clientConfig": {"service": {"name": "xpo-webhook", "namespace": "xml-pipeline-system",
                                                      "path": "/client-pods", "port": 443}}}]}
    resp = await k8s.post(MWC_PATH, json=mwc)
    assert resp.status == 201, await resp.text()
    port = free_port()
    settings = dataclasses.replace(TEST_SETTINGS, webhook_port=port, webhook_host="127.0.0.1",
                                   webhook_configuration=MWC)
    await start_operator(settings, admin=ReadyAdmin())
    for name, spec in (("shop", {"backend": {"redis": {"mode": "shared", "ttl": 600}}}),
                       ("local", {"backend": {"redis": {"mode": "dedicated"}}}),
                       ("ext", {"backend": {"redis": {"mode": "external", "external": {
                           "url": "redis://redis.example:6379/0",
                           "passwordSecretRef": {"name": "ext-pw", "key": "pw"}}}}})):
        resp = await k8s.post(org_path(), json=organism(name, {"config": {"listeners": LISTENERS}, **spec}))
        assert resp.status == 201, await resp.text()
    for bound in ("shop", "local"):  # both bound before any review (the operator handles them in turn)
        await eventually(lambda: ((get_obj(k8s, "xml-pipeline.dev/v1alpha1/organisms", bound) or {})
                                  .get("status") or {}).get("binding"))
    # The operator wrote its certificate's CA into the configuration (as the API server needs it).
    cfg = await eventually(lambda: (c := get_obj(k8s, "admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
                                                 MWC, None)) and c["webhooks"][0]["clientConfig"].get("caBundle") and c)
    ca = base64.b64decode(cfg["webhooks"][0]["clientConfig"]["caBundle"]).decode()
    context = ssl.create_default_context(cadata=ca)  # verified: hostname 127.0.0.1 is in the certificate
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context))

    async def call(body: dict[str, Any]) -> dict[str, Any]:
        async with session.post(f"https://127.0.0.1:{port}/client-pods", json=body) as r:
            assert r.status == 200, await r.text()
            data = await r.json()
        assert data["response"]["uid"] == body["request"]["uid"]
        return data["response"]

    yield call
    await session.close()


def patch_of(response: dict[str, Any]) -> list[dict[str, Any]]:
    assert response["allowed"] is True, response
    assert response.get("patchType") == "JSONPatch"
    return json.loads(base64.b64decode(response["patch"]))


async def test_create_gets_env_from_the_binding_secret(hook: Any) -> None:
    mine = {"name": "XP_REDIS_URL", "value": "redis://elsewhere:6379"}  # replaced: the label asked for shop
    p = pod({webhook.CLIENT_LABEL: "shop"}, env=[{"name": "LOG", "value": "1"}, mine])
    ops = patch_of(await hook(review(p)))
    result = apply_json_patch(p, ops)
    for c in result["spec"]["containers"]:
        env = {e["name"]: e for e in c["env"]}
        assert env["XP_BACKEND_TYPE"] == {"name": "XP_BACKEND_TYPE", "value": "redis"}
        for var, key in webhook.ENV_FROM_BINDING:
            assert env[var] == {"name": var, "valueFrom": {"secretKeyRef": {"name": "shop-binding", "key": key}}}
        assert "value" not in env["XP_REDIS_PASSWORD"]  # never a literal secret
    assert {"name": "LOG", "value": "1"} in result["spec"]["containers"][0]["env"]
    assert result["metadata"] == p["metadata"] and "volumes" not in result["spec"]


async def test_dedicated_organism_is_bound_too(hook: Any) -> None:
    p = pod({webhook.CLIENT_LABEL: "local"})
    env = {e["name"]: e for e in apply_json_patch(p, patch_of(await hook(review(p))))["spec"]["containers"][0]["env"]}
    assert env["XP_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "local-binding", "key": "password"}


async def test_binding_annotation_mounts_the_binding(hook: Any) -> None:
    p = pod({webhook.CLIENT_LABEL: "shop"}, {webhook.INJECT_ANNOTATION: "binding"})
    result = apply_json_patch(p, patch_of(await hook(review(p))))
    assert result["spec"]["volumes"] == [{"name": "xml-pipeline-binding", "secret": {"secretName": "shop-binding"}}]
    for c in result["spec"]["containers"]:
        assert {"name": "SERVICE_BINDING_ROOT", "value": "/bindings"} in c["env"]
        assert c["volumeMounts"] == [{"name": "xml-pipeline-binding", "mountPath": "/bindings/shop", "readOnly": True}]


async def test_dry_run_gets_the_same_patch(hook: Any) -> None:
    p = pod({webhook.CLIENT_LABEL: "shop"})
    assert patch_of(await hook(review(p, dry_run=True))) == patch_of(await hook(review(p)))


async def test_update_and_unlabelled_pods_pass_unchanged(hook: Any) -> None:
    labelled = pod({webhook.CLIENT_LABEL: "shop"})
    for response in (await hook(review(labelled, "UPDATE", old=labelled)), await hook(review(pod({"app": "x"})))):
        assert response["allowed"] is True and "patch" not in response, response


async def test_missing_organism_and_unbound_organism_are_refused(hook: Any) -> None:
    response = await hook(review(pod({webhook.CLIENT_LABEL: "nope"})))
    assert response["allowed"] is False
    assert "no Organism 'nope' in namespace 'default'" in response["status"]["message"]
    assert response["status"]["code"] == 403
    response = await hook(review(pod({webhook.CLIENT_LABEL: "ext"})))
    assert response["allowed"] is False and "not on an external one" in response["status"]["message"], response
    response = await hook(review(pod({webhook.CLIENT_LABEL: "shop"}, {webhook.INJECT_ANNOTATION: "files"})))
    assert response["allowed"] is False and "env, binding" in response["status"]["message"], response


async def test_example_deployment_pod_gets_the_config(hook: Any) -> None:
    deployment = yaml.safe_load((ROOT / "examples" / "client" / "deployment.yaml").read_text())
    template = deployment["spec"]["template"]
    p = {"apiVersion": "v1", "kind": "Pod", "metadata": {**template["metadata"], "name": "shop-frontend-abc",
                                                        "namespace": deployment["metadata"]["namespace"]},
         "spec": template["spec"]}
    result = apply_json_patch(p, patch_of(await hook(review(p))))
    env = {e["name"]: e for e in result["spec"]["containers"][0]["env"]}
    assert env["XP_REDIS_USERNAME"]["valueFrom"]["secretKeyRef"] == {"name": "shop-binding", "key": "username"}
    assert result["spec"]["containers"][0]["volumeMounts"] == template["spec"]["containers"][0]["volumeMounts"]


def test_pod_changes_is_pure_and_idempotent() -> None:
    p = pod({webhook.CLIENT_LABEL: "shop"})
    once = webhook.pod_changes(p, "shop")
    again = webhook.pod_changes({**p, "spec": {**p["spec"], **once}}, "shop")
    assert once == again and p == pod({webhook.CLIENT_LABEL: "shop"})


async def test_certificate_from_a_directory_as_cert_manager_writes_it(k8s: Cluster, start_operator: Any,
                                                                      tmp_path: Path) -> None:
    """XPO_WEBHOOK_CERT_DIR: the server presents the certificate found there (cert-manager's tls.crt and
    tls.key) and publishes nothing (cert-manager injects the CA)."""
    cert, key = webhook.self_signed("xpo-webhook.xml-pipeline-system.svc", extra_sans=["127.0.0.1"])
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    port = free_port()
    settings = dataclasses.replace(TEST_SETTINGS, webhook_port=port, webhook_host="127.0.0.1",
                                   webhook_cert_dir=str(tmp_path))
    await start_operator(settings, admin=ReadyAdmin())
    context = ssl.create_default_context(cadata=cert.decode())
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        async def answer() -> Any:
            try:
                async with session.post(f"https://127.0.0.1:{port}/client-pods",
                                        json=review(pod({webhook.CLIENT_LABEL: "nope"}))) as r:
                    return (await r.json())["response"]
            except aiohttp.ClientConnectionError:
                return None
        response = await eventually(answer)
    assert response["allowed"] is False and "no Organism 'nope'" in response["status"]["message"]


def test_webhook_settings_are_validated() -> None:
    from xml_pipeline.errors import ConfigError
    from xml_pipeline_operator.settings import OperatorSettings
    s = OperatorSettings.from_env({"XPO_WEBHOOK_PORT": "9443", "XPO_WEBHOOK_HOST": "x.ns.svc",
                                   "XPO_WEBHOOK_CONFIGURATION": "xpo-clients"})
    assert (s.webhook_port, s.webhook_host, s.webhook_configuration, s.webhook_cert_dir) == (
        9443, "x.ns.svc", "xpo-clients", None)
    assert OperatorSettings.from_env({}).webhook_port == 0
    with pytest.raises(ConfigError, match="XPO_WEBHOOK_PORT"):
        OperatorSettings.from_env({"XPO_WEBHOOK_PORT": "70000"})
    with pytest.raises(ConfigError, match="XPO_WEBHOOK_HOST"):
        OperatorSettings.from_env({"XPO_WEBHOOK_HOST": "a b"})
