"""End to end over TLS with real processes: the organism's pump and worker (`xml-pipeline pump` / `worker`)
on a TLS-only redis-server with a private CA, verifying it with the CA file their organism.yaml names
(as the operator's ConfigMap does), and a "user pod" whose environment and files are exactly what the
injection webhook's env-mode patch gives a labelled pod (secretKeyRefs resolved from the binding Secret,
the binding's ca.crt mounted). Neither trusts the CA any other way."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis_server import TLSFiles, TLSRedisServer

from xml_pipeline_operator import webhook
from xml_pipeline_operator.desired.binding import binding_values
from xml_pipeline_operator.desired.tls import CA_KEY
from xml_pipeline_operator.model import parse_organism
from xml_pipeline_operator.settings import OperatorSettings
from xml_pipeline_operator.tenancy import client_acl

from .conftest import ADMIN_PASSWORD, Org, stop_gracefully
from .test_client_pods import USER_POD, check
from .test_client_tls import start_tls
from .test_pods_restricted import CLI, ORGANISM_YAML


#: The user pod of test_client_pods, its raw probe connection verifying with the configured CA too.
TLS_USER_POD = USER_POD.replace("password=cfg.redis_password)", "password=cfg.redis_password, **cfg.tls_kwargs())")
assert TLS_USER_POD != USER_POD


def run_user_pod(env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", TLS_USER_POD], env=env, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout))


@pytest.fixture
def tls_shared(tls_files: TLSFiles) -> Iterator[TLSRedisServer]:
    server = start_tls(tls_files, ADMIN_PASSWORD)
    yield server
    server.cleanup()


def trust_nothing_extra(env: dict[str, str]) -> dict[str, str]:
    """No SSL_CERT_FILE / SSL_CERT_DIR pointing at the test CA: only the configured CA file may verify."""
    return {k: v for k, v in env.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}


@pytest.mark.timeout(150)
def test_pods_and_a_user_pod_over_tls_with_the_ca_file(make_org: Callable[..., Org], tls_shared: TLSRedisServer,
                                                       tmp_path: Path) -> None:
    if not Path(CLI).exists():
        pytest.skip("the xml-pipeline console script is not installed in this environment")
    org = make_org("tlspods", server=tls_shared)
    name = org.prefix[len("xp:t."):-1]
    key, ca = secrets.token_hex(16), tls_shared.tls.ca.read_text()
    spec = parse_organism({"metadata": {"name": name, "namespace": "t", "uid": "u-1"},
                           "spec": {"backend": {"redis": {"mode": "shared", "ttl": 600}},
                                    "config": {"listeners": [{"name": "greeter", "handler": "m:f"}]}}},
                          OperatorSettings(shared_redis_url=tls_shared.url, shared_redis_ca=ca))
    binding = binding_values(spec, tls_shared.url, {"signing-key": key, CA_KEY: ca}, secrets.token_hex(32))
    assert binding["tls"] == "true" and binding[CA_KEY] == ca
    admin = tls_shared.client()
    client_acl.ensure_client_user(admin, binding["username"], binding["password"], org.prefix)

    # The pods: organism.yaml names the mounted CA file (the operator's ConfigMap and Secret volume).
    pod_ca = tmp_path / "redis-ca" / "ca.crt"
    pod_ca.parent.mkdir()
    pod_ca.write_text(ca)
    config = tmp_path / "organism.yaml"
    config.write_text(ORGANISM_YAML.replace("  type: redis\n", f"  type: redis\n  redis_ca_cert: {pod_ca}\n"))
    env = {**trust_nothing_extra(dict(os.environ)), "XP_ORGANISM": "restricted", "XP_CONFIG": str(config),
           "XP_BACKEND_TYPE": "redis", "XP_REDIS_URL": tls_shared.url, "XP_REDIS_USERNAME": org.username,
           "XP_REDIS_PASSWORD": org.password, "XP_REDIS_PREFIX": org.prefix, "XP_REDIS_TTL": "600",
           "XP_SIGNING_KEY": key}
    procs = [subprocess.Popen([CLI, role, "--heartbeat-file", str(tmp_path / f"{role}.hb")],
                              env={**env, "XP_ROLE": role}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for role in ("pump", "worker")]
    try:
        # The user pod: the webhook's env-mode patch for an organism on a TLS Redis, applied as the kubelet would.
        pod = {"metadata": {"labels": {webhook.CLIENT_LABEL: name}}, "spec": {"containers": [{"name": "web"}]}}
        changes = webhook.pod_changes(pod, name, tls=True)
        (container,) = changes["containers"]
        (volume,) = changes["volumes"]
        (mount,) = container["volumeMounts"]
        user_env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
        for e in container["env"]:
            user_env[e["name"]] = e["value"] if "value" in e else binding[e["valueFrom"]["secretKeyRef"]["key"]]
        files = tmp_path / "pod" / mount["mountPath"].lstrip("/")
        files.mkdir(parents=True)
        for item in volume["secret"]["items"]:
            (files / item["path"]).write_text(binding[item["key"]])
        user_env["SERVICE_BINDING_ROOT"] = str(tmp_path / "pod" / user_env["SERVICE_BINDING_ROOT"].lstrip("/"))
        try:
            out = run_user_pod(user_env)
        except AssertionError as e:  # the pods' side of the story helps more than the user pod's alone
            for p in procs:
                p.kill()
            raise AssertionError(f"{e}\n" + "\n".join(p.communicate()[1].decode()[-2000:] for p in procs)) from None
        check(out)
        # `xml-pipeline send` in the same pod: the CLI finds the CA the same way.
        sent = subprocess.run([CLI, "send", "--to", "greeter", '<greet name="Cy" lucky="10"/>', "--wait",
                               "--timeout", "45"], env=user_env, capture_output=True, text=True, timeout=90)
        assert sent.returncode == 0 and "Hello, Cy" in sent.stdout, sent.stderr[-2000:]
        # Without the mounted CA the same pod cannot verify the server.
        (files / CA_KEY).unlink()
        failed = subprocess.run([CLI, "send", "--to", "greeter", "<greet/>"], env=user_env, capture_output=True,
                                text=True, timeout=60)
        assert failed.returncode != 0 and "certificate verify failed" in failed.stderr + failed.stdout, failed.stderr
    finally:
        stop_gracefully(procs)
        admin.execute_command("ACL", "DELUSER", binding["username"])
        admin.close()
