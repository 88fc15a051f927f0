"""End to end with real processes: a pump and a worker (`xml-pipeline pump` / `worker`) logged in as an
organism's user on a real redis-server, and a separate "user pod" process whose environment is exactly
what the injection webhook's patch gives a labelled pod (each secretKeyRef resolved from the binding
Secret the operator builds). The user pod sends, gets answers, reads the thread -- and is refused
everything else. The same with the binding mounted as files instead of the environment."""
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
import redis

from xml_pipeline_operator import webhook
from xml_pipeline_operator.desired.binding import binding_values
from xml_pipeline_operator.model import parse_organism
from xml_pipeline_operator.settings import OperatorSettings
from xml_pipeline_operator.tenancy import client_acl

from .conftest import Org, stop_gracefully
from .test_pods_restricted import CLI, ORGANISM_YAML, acl_denials

USER_POD = r'''
import json, sys
import redis
from xml_pipeline.client import OrganismClient
from xml_pipeline.message_bus.message import Message

out = {}
with OrganismClient() as client:
    answer = client.request(Message(sender="web", to="greeter", payload='<greet name="Bo" lucky="30"/>'), timeout=45)
    out["answer"] = answer.text()
    out["thread"] = answer.thread
    out["slots"] = [[s.from_id, s.to_id] for s in client.read_thread(answer.thread)]
    out["threads"] = client.threads()
    cfg = client.config
    raw = redis.Redis.from_url(cfg.redis_url, username=cfg.redis_username, password=cfg.redis_password)
    p = cfg.redis_prefix
    denied = {}
    for name, cmd in {
        "read other clients' messages": ("XRANGE", p + "ingress", "-", "+"),
        "forge an answer": ("XADD", p + "egress", "*", "xml", "<forged/>"),
        "write the context": ("RPUSH", p + "buffer:{" + answer.thread + "}", "forged"),
        "delete the context": ("DEL", p + "buffer:{" + answer.thread + "}"),
        "read worker temp data": ("GET", p + "tmp:{x}"),
        "read the task stream": ("XRANGE", p + "tasks", "-", "+"),
        "read the dead letters": ("XRANGE", p + "dlq", "-", "+"),
        "run a function": ("FCALL_RO", "xp_0_version", 0),
        "scan": ("SCAN", 0),
        "another prefix": ("GET", "xp:other:chain:x"),
    }.items():
        try:
            raw.execute_command(*cmd)
            denied[name] = "allowed"
        except redis.exceptions.NoPermissionError:
            denied[name] = "NOPERM"
    out["denied"] = denied
print(json.dumps(out))
'''


@pytest.fixture
def organism(make_org: Callable[..., Org], admin: redis.Redis) -> Iterator[dict[str, Any]]:
    """An organism user (pods) and the operator's binding values and client user for it."""
    org = make_org("pods")
    name = org.prefix[len("xp:t."):-1]  # make_org's prefix is the default one of Organism t/<name>
    key = secrets.token_hex(16)
    settings = OperatorSettings(shared_redis_url=org.server.url)
    spec = parse_organism({"apiVersion": "xml-pipeline.dev/v1alpha1", "kind": "Organism",
                           "metadata": {"name": name, "namespace": "t", "uid": "u-1"},
                           "spec": {"backend": {"redis": {"mode": "shared", "ttl": 600}},
                                    "config": {"listeners": [{"name": "greeter", "handler": "m:f"}]}}}, settings)
    values = binding_values(spec, org.server.url, {"signing-key": key}, secrets.token_hex(32))
    assert values["prefix"] == org.prefix
    client_acl.ensure_client_user(admin, values["username"], values["password"], org.prefix)
    yield {"org": org, "name": name, "key": key, "binding": values}
    admin.execute_command("ACL", "DELUSER", values["username"])


@pytest.fixture
def pods(organism: dict[str, Any], tmp_path: Path) -> Iterator[None]:
    if not Path(CLI).exists():
        pytest.skip("the xml-pipeline console script is not installed in this environment")
    org: Org = organism["org"]
    config = tmp_path / "organism.yaml"
    config.write_text(ORGANISM_YAML)
    env = {**os.environ, "XP_ORGANISM": "restricted", "XP_CONFIG": str(config), "XP_BACKEND_TYPE": "redis",
           "XP_REDIS_URL": org.server.url, "XP_REDIS_USERNAME": org.username, "XP_REDIS_PASSWORD": org.password,
           "XP_REDIS_PREFIX": org.prefix, "XP_REDIS_TTL": "600", "XP_SIGNING_KEY": organism["key"]}
    procs = [subprocess.Popen([CLI, role, "--heartbeat-file", str(tmp_path / f"{role}.hb")],
                              env={**env, "XP_ROLE": role}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for role in ("pump", "worker")]
    yield
    stop_gracefully(procs)


def pod_env(organism: str, binding: dict[str, str]) -> dict[str, str]:
    """The environment of a labelled pod after the webhook's patch: its env entries with every
    secretKeyRef resolved from the binding Secret (what the kubelet does), plus a bare PATH/HOME."""
    pod = {"metadata": {"labels": {webhook.CLIENT_LABEL: organism}}, "spec": {"containers": [{"name": "web"}]}}
    (container,) = webhook.pod_changes(pod, organism)["containers"]
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    for e in container["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            assert ref["name"] == f"{organism}-binding"
            env[e["name"]] = binding[ref["key"]]
    return env


def run_user_pod(env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", USER_POD], env=env, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout))


def check(out: dict[str, Any]) -> None:
    assert "Hello, Bo" in out["answer"] and "10 primes below 30" in out["answer"], out
    assert out["thread"] in out["threads"]
    assert ["greeter", "web"] in out["slots"], out["slots"]  # the answer, as the context buffer holds it
    assert out["denied"] == {k: "NOPERM" for k in out["denied"]}, out["denied"]


@pytest.mark.timeout(150)
def test_user_pod_with_the_injected_environment(organism: dict[str, Any], pods: None, admin: redis.Redis) -> None:
    env = pod_env(organism["name"], organism["binding"])
    assert set(env) >= {"XP_BACKEND_TYPE", "XP_REDIS_URL", "XP_REDIS_USERNAME", "XP_REDIS_PASSWORD",
                        "XP_REDIS_PREFIX", "XP_REDIS_TTL", "XP_SIGNING_KEY"}
    admin.execute_command("ACL", "LOG", "RESET")
    check(run_user_pod(env))
    # `xml-pipeline send` in the same pod: the CLI uses the client API with exactly these rights.
    sent = subprocess.run([CLI, "send", "--to", "greeter", '<greet name="Cy" lucky="10"/>', "--wait",
                           "--timeout", "45"], env=env, capture_output=True, text=True, timeout=90)
    assert sent.returncode == 0 and "Hello, Cy" in sent.stdout, sent.stderr[-2000:]
    # The only refusals Redis logged for the client user are the ones the user pod provoked on purpose.
    logged = {bytes(d["object"]).decode() for d in acl_denials(admin, organism["binding"]["username"])}
    provoked = {"del", "rpush", "xrange", "fcall_ro", "scan", "xp:other:chain:x"} | {organism["org"].prefix + k for k in (
        "ingress", "egress", "tmp:{x}", "tasks", "dlq")} | {k for k in logged if "buffer:{" in k}
    assert logged and logged <= provoked, logged - provoked
    assert acl_denials(admin, organism["org"].username) == []  # the pods were never refused anything


@pytest.mark.timeout(150)
def test_user_pod_with_the_mounted_binding(organism: dict[str, Any], pods: None, tmp_path: Path) -> None:
    root = tmp_path / "bindings"
    d = root / organism["name"]
    d.mkdir(parents=True)
    for k, v in organism["binding"].items():
        (d / k).write_text(v)
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "SERVICE_BINDING_ROOT": str(root)}
    check(run_user_pod(env))
