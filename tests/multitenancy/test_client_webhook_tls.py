"""The injection webhook for an organism whose Redis speaks TLS: env mode mounts the binding's ca.crt
(with type and provider, optional) so the library verifies the server with it; the patch is applied to
a pod, the pod's environment and files are made as the kubelet would, and a client talks TLS with them."""
from __future__ import annotations

import base64
import dataclasses
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis_server import TLSFiles, TLSRedisServer

from xml_pipeline.client import OrganismClient
from xml_pipeline.memory.factory import default_config
from xml_pipeline_operator import webhook

from . import test_operator_shared as base
from .conftest import ADMIN_PASSWORD
from .test_client_tls import start_tls

k8s, kubeconfig, start_operator = base.k8s, base.kubeconfig, base.start_operator
harness, eventually, get_obj = base.harness, base.eventually, base.get_obj
import test_operator_webhook as wh  # noqa: E402 - tests/operator is on sys.path once `base` is imported


def test_env_mode_mounts_the_ca_only_for_tls() -> None:
    p = wh.pod({webhook.CLIENT_LABEL: "shop"})
    plain = webhook.pod_changes(p, "shop", tls=False)
    assert "volumes" not in plain and all("volumeMounts" not in c for c in plain["containers"])
    changes = webhook.pod_changes(p, "shop", tls=True)
    assert changes["volumes"] == [{"name": "xml-pipeline-binding", "secret": {
        "secretName": "shop-binding", "optional": True,
        "items": [{"key": "type", "path": "type"}, {"key": "provider", "path": "provider"},
                  {"key": "ca.crt", "path": "ca.crt"}]}}]
    for c in changes["containers"]:
        assert {"name": "SERVICE_BINDING_ROOT", "value": "/bindings"} in c["env"]
        assert c["volumeMounts"] == [{"name": "xml-pipeline-binding", "mountPath": "/bindings/shop", "readOnly": True}]
    again = webhook.pod_changes({**p, "spec": {**p["spec"], **changes}}, "shop", tls=True)
    assert again == changes  # idempotent
    assert webhook.uses_tls({"status": {"redis": {"endpoint": "rediss://r:6380/0"}}})
    assert not webhook.uses_tls({"status": {"redis": {"endpoint": "redis://r:6379/0"}}}) and not webhook.uses_tls(None)


@pytest.fixture
def tls_shared(tls_files: TLSFiles) -> Any:
    server = start_tls(tls_files, ADMIN_PASSWORD)
    yield server
    server.cleanup()


async def test_env_mode_pod_talks_tls_with_the_mounted_ca(k8s: Any, start_operator: Any, tls_shared: TLSRedisServer,
                                                          tmp_path: Path) -> None:
    from redis_server import free_port
    from xml_pipeline_operator.tenancy.admin import SharedRedisAdmin

    resp = await k8s.post(wh.MWC_PATH, json={"apiVersion": "admissionregistration.k8s.io/v1",
                                             "kind": "MutatingWebhookConfiguration", "metadata": {"name": wh.MWC},
                                             "webhooks": [{"name": "client-pods.xml-pipeline.dev",
                                                           "clientConfig": {"service": {"name": "w", "namespace": "x"}}}]})
    assert resp.status == 201
    port = free_port()
    settings = dataclasses.replace(harness.TEST_SETTINGS, webhook_port=port, webhook_host="127.0.0.1",
                                   webhook_configuration=wh.MWC, shared_redis_url=tls_shared.url,
                                   shared_redis_password=ADMIN_PASSWORD, shared_redis_ca=tls_shared.tls.ca.read_text())
    await start_operator(settings, admin=SharedRedisAdmin(settings))
    await base.create(k8s, "shop", base.shared_spec())
    await eventually(lambda: ((get_obj(k8s, base.ORGANISMS, "shop") or {}).get("status") or {}).get("binding"))
    cfg = await eventually(lambda: (c := get_obj(k8s, "admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
                                                 wh.MWC, None)) and c["webhooks"][0]["clientConfig"].get("caBundle") and c)
    context = ssl.create_default_context(cadata=base64.b64decode(cfg["webhooks"][0]["clientConfig"]["caBundle"]).decode())
    p = wh.pod({webhook.CLIENT_LABEL: "shop"})
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        async with session.post(f"https://127.0.0.1:{port}/client-pods", json=wh.review(p)) as r:
            answer = (await r.json())["response"]
    pod = wh.apply_json_patch(p, wh.patch_of(answer))

    # The kubelet's part: secretKeyRefs resolved from the binding Secret, its items mounted as files.
    secret = {k: base64.b64decode(v).decode() for k, v in get_obj(k8s, "v1/secrets", "shop-binding")["data"].items()}
    assert secret["tls"] == "true" and "ca.crt" in secret
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e.get("value") or secret[e["valueFrom"]["secretKeyRef"]["key"]] for e in container["env"]}
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == webhook.BINDING_VOLUME)
    mount = next(m for m in container["volumeMounts"] if m["name"] == webhook.BINDING_VOLUME)
    root = tmp_path / env["SERVICE_BINDING_ROOT"].lstrip("/")
    where = tmp_path / mount["mountPath"].lstrip("/")
    where.mkdir(parents=True)
    for item in volume["secret"]["items"]:
        (where / item["path"]).write_text(secret[item["key"]])
    assert sorted(f.name for f in where.iterdir()) == ["ca.crt", "provider", "type"]  # no password on disk
    config = default_config({**env, "SERVICE_BINDING_ROOT": str(root)})
    assert config.redis_ca_cert == str(where / "ca.crt") and config.redis_username == "xpc-default.shop"
    with OrganismClient(config) as client:
        assert client.threads() == []
